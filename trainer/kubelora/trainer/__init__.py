"""The kubelora trainer: LoRA, QLoRA and DoRA fine-tuning of a LoRAJob spec.

Run as ``python -m kubelora.trainer --spec FILE``. The work is done in named steps, each its own
module: :mod:`~kubelora.trainer.config` → :mod:`~kubelora.trainer.fetch` →
:mod:`~kubelora.trainer.modeling` → :mod:`~kubelora.trainer.data` → :mod:`~kubelora.trainer.train` →
:mod:`~kubelora.trainer.evaluate` → :mod:`~kubelora.trainer.publish` → :mod:`~kubelora.trainer.report`.
:mod:`~kubelora.trainer.estimate` (no torch needed) and :mod:`~kubelora.trainer.tiny` are reused by
the operator, the CLI, tests and benchmarks.
"""
