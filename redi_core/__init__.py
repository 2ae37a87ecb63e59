"""The pack's pure algorithms (no ComfyUI import):

  retrieval.py     ReDi: key state, retrieval, the quality guard, blending of values
  blend.py         least-squares blend weights
  noise_levels.py  the guard's noise-level check per schedule
  kb_access.py     the narrow interface through which retrieval reads a KB (kb_tools.storage)
  frdiff.py        FRDiff: keyframe schedules, feature reuse and score mixing
  style_split.py   splitting a prompt into content and style
"""
