"""Data parallelism: 2 CPU processes (gloo) reach the same pools and metrics as 1 process."""
import json
import socket

import pytest
import torch
import torch.multiprocessing as mp
from cil_helpers import ddp_config, ddp_worker, synthetic_tasks

from pclr.cil import CILTrainer
from pclr.inject import lrp_state_dict
from pclr.models.tiny import tiny_causal_lm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    result = tmp_path / "ddp.json"
    mp.spawn(ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp"), str(result)), nprocs=2, join=True)
    ddp = json.loads(result.read_text())

    single = CILTrainer(tiny_causal_lm(seed=0), ddp_config(), synthetic_tasks(2, n_train=16),
                        output_dir=str(tmp_path / "one"))
    res = single.run()
    assert ddp["matrix"] == res.to_dict()["matrix"]
    B = {k: v for k, v in lrp_state_dict(single.model).items() if k.endswith("B_m")}
    assert B.keys() == ddp["B"].keys()
    for k, v in ddp["B"].items():
        # same math, different float summation order across processes
        torch.testing.assert_close(torch.tensor(v), B[k], atol=2e-3, rtol=1e-2)
