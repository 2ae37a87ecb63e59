"""Building one KB on several ComfyUI servers: the plan of build units, the scheduler, the
coordinator, the HTTP client and the KB-serving route, and the check of each unit's result."""
