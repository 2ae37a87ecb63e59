"""Knowledge bases of sampling trajectories for ReDi: on-disk format, faiss search,
least-squares blending, the ReDi sampling loop and the `python -m kb_tools` CLI.

Pure code: nothing here imports ComfyUI (the headless `build` command loads it
lazily through the pack's own node glue).
"""
