"""The UI<->API conversion follows the frontend's "control after generate" rule."""

from redi_demo.workflow_format import api_to_ui, has_control, ui_to_api

INFO = {
    "Node": {
        "input": {"required": {
            "seed": ["INT", {"default": 1}],  # no declaration: the frontend adds the widget (name rule)
            "kb_seed": ["INT", {"default": 2, "control_after_generate": True}],
            "noise_seed": ["INT", {"default": 3, "control_after_generate": False}],  # declared off
            "steps": ["INT", {"default": 4}],
            "name": ["STRING", {"default": "x"}],
        }},
        "input_order": {"required": ["seed", "kb_seed", "noise_seed", "steps", "name"]},
        "output": [], "output_name": [],
    },
}


def test_has_control_follows_the_frontend_rule():
    spec = INFO["Node"]["input"]["required"]
    assert has_control("seed", spec["seed"])
    assert has_control("kb_seed", spec["kb_seed"])
    assert not has_control("noise_seed", spec["noise_seed"])
    assert not has_control("steps", spec["steps"])
    assert not has_control("seed", ["STRING", {}])
    assert has_control("x", [["a", "b"], {"control_after_generate": True}])


def test_widget_slots_and_round_trip():
    api = {"1": {"class_type": "Node", "inputs": {"seed": 10, "kb_seed": 20, "noise_seed": 30, "steps": 40, "name": "n"}}}
    ui = api_to_ui(api, INFO)
    assert ui["nodes"][0]["widgets_values"] == [10, "fixed", 20, "fixed", 30, 40, "n"]
    assert ui_to_api(ui, INFO) == api
