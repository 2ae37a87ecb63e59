"""The example workflows, written once in API format. `scripts/make_workflows.py`
turns them into example_workflows/NAME.json (UI format) and
example_workflows/api/NAME.json (API format)."""

from __future__ import annotations

from redi_core.retrieval import GUARD_DEFAULTS
from redi_demo import dataset, demo_models

KB_NAME = "demo_shapes_kb"
SIZE = 64
SD1 = demo_models.MODELS["sd1"]
CKPT = SD1.ckpt
STEPS, CFG, SAMPLER, SCHEDULER = SD1.steps, SD1.cfg, SD1.sampler, SD1.scheduler
NEGATIVE = ""
DEMO_PROMPT = "a large red circle at the center on a white background"


def kb_prompts(n: int = 48, seed: int = 7) -> str:
    return "\n".join(s.content_prompt() for s in dataset.random_samples(n, seed, styles=("plain",)))


def _base(prompt: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
    }


def _decode_save(src: list, prefix: str) -> dict:
    return {
        "8": {"class_type": "VAEDecode", "inputs": {"samples": src, "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    }


def _builder(prompts: str) -> dict:
    return {
        "class_type": "ReDiKBBuilder",
        "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "prompts": prompts, "negative": NEGATIVE,
            "sampler_name": SAMPLER, "scheduler": SCHEDULER, "steps": STEPS, "cfg": CFG,
            "width": SIZE, "height": SIZE, "batch_size": 16, "seed_mode": "fixed", "seed": 1024,
            "stored_steps": "3,4,5,6,8,10,12,14", "kb_name": KB_NAME, "prompts_file": "",
        },
    }


REDI_OPTS = {"key_step": 4, "value_step": 10, "neighbours": 1, "key_space": "auto", **GUARD_DEFAULTS}
# ReDi KSampler's optional library inputs at their defaults (a connected KB; the frontend queues every widget)
CONNECTED_KB = {"library": "", "speed": "fixed k/v", "learn": True, "store_prompt_text": False, "max_trajectories": 5000}
SAMPLER_CONNECTED_KB = {k: v for k, v in CONNECTED_KB.items() if k != "store_prompt_text"}  # ReDi Sampler's (no prompt input)


def demo_txt2img(prompt: str = DEMO_PROMPT, seed: int = 1024) -> dict:
    g = _base(prompt)
    g["5"] = {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": seed, "steps": STEPS, "cfg": CFG, "sampler_name": SAMPLER, "scheduler": SCHEDULER,
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}}
    g.update(_decode_save(["5", 0], "demo_txt2img"))
    return g


def redi_build_kb(prompts: str | None = None) -> dict:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}}, "6": _builder(prompts or kb_prompts())}


def redi_ksampler(prompt: str = DEMO_PROMPT, seed: int = 1024, prompts: str | None = None) -> dict:
    g = _base(prompt)
    g["6"] = _builder(prompts or kb_prompts())
    g["7"] = {"class_type": "ReDiKSampler", "inputs": {
        "model": ["1", 0], "seed": seed, "steps": STEPS, "cfg": CFG, "sampler_name": SAMPLER, "scheduler": SCHEDULER,
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "kb": ["6", 0], **REDI_OPTS, **CONNECTED_KB}}
    g.update(_decode_save(["7", 0], "redi_ksampler"))
    return g


LIBRARY = "demo_library"


def redi_record(prompt: str = DEMO_PROMPT, seed: int = 1024, library: str = LIBRARY) -> dict:
    """The stock KSampler behind ReDi Record: every generation adds its trajectory to the library."""
    g = demo_txt2img(prompt, seed)
    g["10"] = {"class_type": "ReDiRecord", "inputs": {"model": ["1", 0], "library": library, "enabled": True, "max_trajectories": 5000}}
    g["5"]["inputs"]["model"] = ["10", 0]
    g["9"]["inputs"]["filename_prefix"] = "redi_record"
    return g


def redi_library(prompt: str = DEMO_PROMPT, seed: int = 1024, library: str = LIBRARY, speed: str = "fidelity") -> dict:
    """ReDi KSampler on a library that fills itself: no KB to build, random seeds."""
    g = _base(prompt)
    g["7"] = {"class_type": "ReDiKSampler", "inputs": {
        "model": ["1", 0], "seed": seed, "steps": STEPS, "cfg": CFG, "sampler_name": SAMPLER, "scheduler": SCHEDULER,
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], **REDI_OPTS,
        "library": library, "speed": speed, "learn": True, "store_prompt_text": False, "max_trajectories": 5000}}
    g.update(_decode_save(["7", 0], "redi_library"))
    return g


def redi_sampler_custom(prompt: str = DEMO_PROMPT, seed: int = 1024, library: str = "") -> dict:
    """ReDi Sampler in SamplerCustomAdvanced, on the KB Loader's KB (or, with `library`, on a library: no loader)."""
    g = _base(prompt)
    if library:
        g["7"] = {"class_type": "ReDiSampler", "inputs": {"sampler_name": SAMPLER, **REDI_OPTS, **SAMPLER_CONNECTED_KB,
                                                          "library": library, "speed": "fidelity"}}
    else:
        g["6"] = {"class_type": "ReDiKBLoader", "inputs": {"kb_name": KB_NAME}}
        g["7"] = {"class_type": "ReDiSampler", "inputs": {"sampler_name": SAMPLER, "kb": ["6", 0], **REDI_OPTS, **SAMPLER_CONNECTED_KB}}
    g["10"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}}
    g["11"] = {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "cfg": CFG}}
    g["12"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": SCHEDULER, "steps": STEPS, "denoise": 1.0}}
    g["13"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["10", 0], "guider": ["11", 0], "sampler": ["7", 0], "sigmas": ["12", 0], "latent_image": ["4", 0]}}
    g.update(_decode_save(["13", 0], "redi_sampler_custom"))
    return g


def _feature_reuse_node(start_percent: float) -> dict:
    return {"class_type": "ReDiFeatureReuse", "inputs": {
        "model": ["1", 0], "interval": 3, "start_percent": start_percent, "end_percent": 1.0, "blocks": "all",
        "parts": "input,middle,output", "score_mixing": True, "mix_bias": 1.0,
        "order": 0, "schedule": "adaptive", "threshold": 0.12}}


def feature_reuse(prompt: str = DEMO_PROMPT, seed: int = 1024) -> dict:
    g = demo_txt2img(prompt, seed)
    g["14"] = _feature_reuse_node(0.0)
    g["5"]["inputs"]["model"] = ["14", 0]
    g["9"]["inputs"]["filename_prefix"] = "feature_reuse"
    return g


def redi_feature_reuse(prompt: str = DEMO_PROMPT, seed: int = 1024, prompts: str | None = None) -> dict:
    """ReDi KSampler on a FeatureReuse model: the KB is built on the unpatched model, and reuse starts
    at 25% so that ReDi's key phase stays on the KB's trajectories."""
    g = redi_ksampler(prompt, seed, prompts)
    g["14"] = _feature_reuse_node(0.25)
    g["7"]["inputs"]["model"] = ["14", 0]
    g["9"]["inputs"]["filename_prefix"] = "redi_feature_reuse"
    return g


STYLE_PROMPT = "a large blue square at the center on a white background, in striped style"


def stylize(prompt: str = STYLE_PROMPT, seed: int = 1024, prompts: str | None = None) -> dict:
    g = redi_ksampler(prompt, seed, prompts)
    del g["2"]
    g["15"] = {"class_type": "ReDiStyleSplit", "inputs": {"clip": ["1", 1], "prompt": prompt, "separator": "", "extra_patterns": ""}}
    g["7"]["inputs"]["positive"] = ["15", 3]
    g["7"]["inputs"]["content_positive"] = ["15", 2]
    g["9"]["inputs"]["filename_prefix"] = "stylize"
    return g


DIT = demo_models.MODELS["dit"]
DIT_KB_NAME = "demo_dit_kb"


def _on_dit(g: dict, prefix: str) -> dict:
    """The same graph on the Flux DiT demo model, at its own scheduler and cfg (and its own KB)."""
    g["1"]["inputs"]["ckpt_name"] = DIT.ckpt
    for node in g.values():
        inputs = node["inputs"]
        if "scheduler" in inputs:
            inputs["scheduler"] = DIT.scheduler
        if "cfg" in inputs:
            inputs["cfg"] = DIT.cfg
        if inputs.get("kb_name") == KB_NAME:
            inputs["kb_name"] = DIT_KB_NAME
    g["9"]["inputs"]["filename_prefix"] = prefix
    return g


def dit_txt2img(prompt: str = DEMO_PROMPT, seed: int = 1024) -> dict:
    return _on_dit(demo_txt2img(prompt, seed), "dit_txt2img")


def dit_redi_ksampler(prompt: str = DEMO_PROMPT, seed: int = 1024, prompts: str | None = None) -> dict:
    return _on_dit(redi_ksampler(prompt, seed, prompts), "dit_redi_ksampler")


def dit_feature_reuse(prompt: str = DEMO_PROMPT, seed: int = 1024) -> dict:
    return _on_dit(feature_reuse(prompt, seed), "dit_feature_reuse")


# name -> builder; the tests run them in this order (the KB is built first)
EXAMPLES = {
    "demo_txt2img": demo_txt2img,
    "redi_build_kb": redi_build_kb,
    "redi_ksampler": redi_ksampler,
    "redi_sampler_custom": redi_sampler_custom,
    "feature_reuse": feature_reuse,
    "stylize": stylize,
    "redi_feature_reuse": redi_feature_reuse,
    "redi_record": redi_record,
    "redi_library": redi_library,
    "dit_txt2img": dit_txt2img,
    "dit_redi_ksampler": dit_redi_ksampler,
    "dit_feature_reuse": dit_feature_reuse,
}

# name -> the UI file's name. The frontend's template browser (1.32.9) shows a custom node pack's
# file name as the template's title and description, in the order the server lists the files
# (nodes/template_order.py sorts this pack's list); short titles stay readable on the cards.
# The API twin keeps the short name: example_workflows/api/NAME.json.
TITLES = {
    "demo_txt2img": "1 Demo model, stock nodes",
    "redi_build_kb": "2 Build a KB, run first",
    "redi_ksampler": "3 ReDi KSampler",
    "redi_sampler_custom": "4 ReDi Sampler, custom",
    "feature_reuse": "5 FeatureReuse, KSampler",
    "stylize": "6 Style Split, stylize",
    "redi_feature_reuse": "7 ReDi and FeatureReuse",
    "redi_record": "8 ReDi Record, KSampler",
    "redi_library": "9 ReDi KSampler, library",
    "dit_txt2img": "10 DiT model, stock nodes",
    "dit_redi_ksampler": "11 ReDi KSampler on the DiT",
    "dit_feature_reuse": "12 FeatureReuse on the DiT",
}

# name -> the note each template opens with (what it shows, what to run first): the browser
# cannot show a custom pack's description, so the workflow says it on the canvas.
_KB = f"The KB `{KB_NAME}` is built by the **ReDi KB Builder** of template 2 (templates 3, 6 and 7 build it too)."
NOTES = {
    "demo_txt2img": "## 1 Demo model, stock nodes\n\nThe pack's small demo model in stock nodes only: Load Checkpoint, "
                    "CLIP Text Encode, KSampler, VAE Decode. Press **Run** for a 64x64 image.",
    "redi_build_kb": "## 2 Build a KB (run this first)\n\nThe **ReDi KB Builder** samples 48 prompts and stores their "
                     f"trajectories as the knowledge base `{KB_NAME}`. Press **Run**; "
                     "a cancelled build resumes on the next run. Then open template 3 or 4.",
    "redi_ksampler": "## 3 ReDi KSampler\n\n**ReDi KSampler** in place of KSampler: it samples steps 0-4, retrieves "
                     "the nearest stored trajectory and jumps to step 10 (6 of 20 steps skipped). The builder here makes "
                     "the KB on the first run and reuses it after. Press **Run**; the node's report shows what it retrieved.",
    "redi_sampler_custom": "## 4 ReDi Sampler, custom sampling\n\n**ReDi Sampler** as the SAMPLER of SamplerCustomAdvanced, "
                           f"with the **ReDi KB Loader**. Run template 2 first. {_KB} The Loader's list shows a new KB by itself.",
    "feature_reuse": "## 5 FeatureReuse on a KSampler\n\n**ReDi FeatureReuse** patches the model: between keyframe steps "
                     "the UNet reuses cached features. Stock KSampler, no KB needed. Press **Run**.",
    "stylize": "## 6 Style Split, stylization\n\n**ReDi Style Split** splits the prompt into content and style: ReDi "
               f"KSampler retrieves with the content and finishes with content + style. {_KB} Press **Run**.",
    "redi_feature_reuse": "## 7 ReDi + FeatureReuse\n\nBoth speed-ups together: FeatureReuse (from 25% of the steps, so "
                          "that ReDi's first steps stay on the KB's trajectories) feeding ReDi KSampler; the KB is built on "
                          f"the unpatched model. {_KB} Press **Run**.",
    "redi_record": "## 8 ReDi Record on a KSampler\n\n**ReDi Record** patches the model: every txt2img run of the stock "
                   f"KSampler (or SamplerCustomAdvanced) adds its trajectory to the library `{LIBRARY}` (models/redi_kb/{LIBRARY}), "
                   "to the KB that fits the model and settings, in the background and at no extra UNet call; the image is "
                   "unchanged. Press **Run** a few times with new seeds, then open template 9.",
    "redi_library": "## 9 ReDi KSampler on a library\n\nNo KB to build: with `library` set, **ReDi KSampler** uses the "
                    f"library's KB that fits this model and settings (`{LIBRARY}`, filled by template 8 or by this node itself). "
                    "Each image jumps as far as its nearest stored trajectory allows (`speed`), and every image sampled in full "
                    "is recorded (`learn`), so it gets faster as you use it. Press **Run**; the report names the KB and each jump.",
    "dit_txt2img": "## 10 DiT demo model, stock nodes\n\nThe pack's second demo model: a small Flux-architecture diffusion "
                   "transformer (double- and single-stream blocks, rectified flow), loaded by the stock Load Checkpoint and "
                   f"sampled by the stock KSampler ({DIT.scheduler} scheduler, cfg {DIT.cfg:g}). Press **Run**.",
    "dit_redi_ksampler": "## 11 ReDi KSampler on the DiT\n\nTemplate 3 on the Flux DiT: the builder makes the KB "
                         f"`{DIT_KB_NAME}` from the DiT's own trajectories on the first run (a KB fits one model), and ReDi "
                         "KSampler jumps from step 4 to step 10. Press **Run**.",
    "dit_feature_reuse": "## 12 FeatureReuse on the DiT\n\n**ReDi FeatureReuse** on the Flux DiT: between keyframe steps "
                         "the transformer's double- and single-stream blocks reuse their cached outputs. Press **Run**.",
}
