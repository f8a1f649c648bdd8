"""With n = r, every expert chosen, no shared ranks and beta_m = LoRA scaling, the LRP is exactly PEFT's LoRA."""
import pytest
import torch
from torch import nn

import pclr

peft = pytest.importorskip("peft")


def test_lrp_equals_peft_lora_output_and_grads():
    torch.manual_seed(0)
    r, alpha = 4, 8
    base = nn.Sequential(nn.Linear(16, 12))
    lora = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], lora_dropout=0.0))
    lin = lora.base_model.model[0]
    with torch.no_grad():
        lin.lora_B["default"].weight.normal_()  # PEFT starts B at zero; make the adapter non-trivial
    A, Bw = lin.lora_A["default"].weight, lin.lora_B["default"].weight  # [r, d_in], [d_out, r]
    x = torch.randn(3, 5, 16, requires_grad=True)
    y_peft = lora(x)
    g = torch.randn_like(y_peft)
    y_peft.backward(g)

    A_m = A.detach().clone().requires_grad_(True)
    B_m = Bw.detach().T.contiguous().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    idx = torch.arange(r, dtype=torch.int32).expand(3, r)
    y = pclr.lrp_linear(x2, lin.base_layer.weight, lin.base_layer.bias, A_m, B_m, idx, torch.ones(3, r),
                        beta_m=alpha / r)
    y.backward(g)
    torch.testing.assert_close(y, y_peft)
    torch.testing.assert_close(x2.grad, x.grad)
    torch.testing.assert_close(A_m.grad, A.grad)
    torch.testing.assert_close(B_m.grad, Bw.grad.T)
