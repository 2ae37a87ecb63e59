"""Pure algorithms of the pack that are not about knowledge bases: prompt style
splitting, FRDiff keyframe schedules and score mixing. No ComfyUI import."""
