"""Scheduler ids the service accepts, with the names A1111/ComfyUI users know them by.

Pure data (no diffusers import) so the ingress can validate and list them; the engines map each id
to a diffusers scheduler class in `deployments.pipelines`.
"""

#: id -> human name. The id is what responses echo and what the compatibility key holds.
SCHEDULERS: dict[str, str] = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "ddim": "DDIM",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras",
    "unipc": "UniPC",
    # Few-step samplers for distilled weights (LCM-LoRA, TCD-LoRA, Hyper-SD): each step predicts
    # the clean image and re-noises it to the next timestep.
    "lcm": "LCM",
    "tcd": "TCD",
}

#: The schedulers that pick their timesteps from a distillation schedule of their own instead of
#: spacing them over the training timesteps: a request gives them no `timestep_spacing` (a 400),
#: and they run at most as many steps as that schedule has (diffusers raises above it). 50 is
#: diffusers' `original_inference_steps` default, which SDXL scheduler configs leave unset.
DISTILLED_SCHEDULE_STEPS: dict[str, int] = {"lcm": 50, "tcd": 50}

_ALIASES: dict[str, str] = {}
for _id, _name in SCHEDULERS.items():
    _ALIASES[_id] = _id
    _ALIASES[_name.lower()] = _id
    _ALIASES[_name.lower().replace("+", "p").replace(" ", "_")] = _id
_ALIASES.update({"euler_ancestral": "euler_a", "k_euler": "euler", "k_euler_a": "euler_a"})


def canonical_scheduler(name: str) -> str:
    """Map an id or a display name ("DPM++ 2M Karras", "dpmpp_2m_karras") to its id.

    Raises ValueError quoting the name when it is unknown.
    """
    key = name.strip().lower()
    if key in _ALIASES:
        return _ALIASES[key]
    known = ", ".join(repr(n) for n in SCHEDULERS.values())
    raise ValueError(f"unknown scheduler {name!r}; use one of {known} (or their ids)")
