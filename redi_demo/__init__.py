"""The pack's demo: a procedural dataset, a small SD1.x-architecture model trained
on it, and an evaluator that scores generated images against their prompts.

`dataset` and `evaluator` are pure (torch/numpy only); `model_config` and `train`
import ComfyUI and are only used inside it or by the training script.
"""
