"""Knowledge bases of sampling trajectories for ReDi and the `python -m kb_tools` CLI.

  storage/      the on-disk format: write, read, validate, upgrade
  distributed/  building one KB on several ComfyUI servers
  measure/      recall and scale measurements
  builder.py    the build loop shared by the KB Builder node and the CLI
  cli.py        `python -m kb_tools COMMAND`

Pure code: nothing here imports ComfyUI (the headless `build` command loads it
lazily through the pack's own node glue).
"""
