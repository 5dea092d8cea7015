"""The served OpenAPI schema, made to say exactly what this deployment accepts.

FastAPI derives the schema from the pydantic models; what it cannot know is added here:
- the deployment's settings: `limits` (steps, n, prompt length, image sides, batch size), which
  the models leave to `check_limits` because they are configuration, not API facts, and the
  served model's name and the scheduler names the server knows;
- multipart bodies, which have no `null` (an absent part is the default) and carry images as file
  parts: their schema is the JSON one without the null branches, with `format: binary` images;
- the 422 responses FastAPI lists for every route: this server answers validation errors 400;
- the LoRA training form (`training_body`), whose `steps` are training steps with limits of their own.
Schemathesis checks the result against the running app in `tests/test_openapi_conformance.py`.
"""

import copy
import math
from typing import Any

from fastapi import FastAPI

from configs.app_args import AppArgs, LimitsConfig
from configs.schedulers import SCHEDULERS
from serve_app.protocol import TRAINING_EXAMPLE_PARTS, TRAINING_EXAMPLE_RULES, LoraTrainingForm

#: The training route, whose form `install_openapi` states apart from the generation fields' limits.
TRAINING_PATH = "/v1/loras/train"


def body_schema(model: type) -> dict:
    """`openapi_extra` for routes that read JSON or multipart themselves (FastAPI cannot declare
    both): the model's schema for JSON, and the same without nulls for multipart."""
    schema = _inlined(model.model_json_schema())
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schema},
                "multipart/form-data": {"schema": _as_form(copy.deepcopy(schema))},
            },
        }
    }


def _inlined(schema: dict) -> dict:
    """The schema with its `$defs` written in place of their `$ref`s: an inline request body's
    references would point into the OpenAPI document, where those definitions are not."""
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            reference = node.get("$ref", "")
            if reference.startswith("#/$defs/"):
                return resolve(copy.deepcopy(definitions[reference.removeprefix("#/$defs/")]))
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)


def training_body(args: AppArgs) -> dict:
    """`openapi_extra` of `POST /v1/loras/train`: a multipart form of the training settings (with
    this deployment's `loras.max_rank` and `training.max_steps`/`max_images` written in) and the
    examples, either repeated `images` + `captions` parts or one `dataset` ZIP."""
    schema = _as_form(_inlined(LoraTrainingForm.model_json_schema()))
    properties = schema["properties"]
    properties["rank"]["maximum"] = min(properties["rank"]["maximum"], args.loras.max_rank)
    properties["steps"]["maximum"] = min(properties["steps"]["maximum"], args.training.max_steps)
    for name in ("images", "captions"):
        properties[name] = {**copy.deepcopy(TRAINING_EXAMPLE_PARTS[name]), "maxItems": args.training.max_images}
    properties["dataset"] = copy.deepcopy(TRAINING_EXAMPLE_PARTS["dataset"])
    schema.update(copy.deepcopy(TRAINING_EXAMPLE_RULES))
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def install_openapi(app: FastAPI, args: AppArgs) -> None:
    """Serve the schema with the deployment's settings written in and the 422s removed (built
    once, cached)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            _drop_422(schema)
            _constrain_properties(schema, _deployment_constraints(args))
            training = schema.get("paths", {}).get(TRAINING_PATH, {}).get("post")
            if training is not None:  # its `steps` are training steps: not the denoising limits above
                training["requestBody"] = training_body(args)["requestBody"]
            _name_served_controlnets(schema, sorted(args.controlnet_roles()))
            if not args.refiner:
                _no_refiner(schema)
            if args.auth.enabled:
                _bearer_keys(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


#: Paths answered without an API key when auth is on.
OPEN_PATHS = ("/healthz", "/v1/files/{file_id}")


def _bearer_keys(schema: dict[str, Any]) -> None:
    """Auth on: every operation takes `Authorization: Bearer <key>`, but the open paths."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {})["apiKey"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key of `auth.keys`; answers 401 without one, 403 without the endpoint's scope.",
    }
    schema["security"] = [{"apiKey": []}]
    for path in OPEN_PATHS:
        for operation in schema.get("paths", {}).get(path, {}).values():
            operation["security"] = []


def side_bounds(limits: LimitsConfig) -> tuple[int, int]:
    """The smallest and largest side (multiples of 8) the schema states. Any two sides in this
    range are accepted; the server also accepts a longer side when width × height still fits
    `limits.max_pixels`, which a JSON schema cannot express."""
    smallest = math.ceil(limits.min_side / 8) * 8
    largest = math.isqrt(limits.max_pixels) // 8 * 8
    return smallest, largest


def _deployment_constraints(args: AppArgs) -> dict[str, dict[str, Any]]:
    """JSON Schema keywords per property name, from the deployment's settings."""
    limits = args.limits
    smallest, largest = side_bounds(limits)
    sides = "|".join(str(side) for side in range(largest, smallest - 1, -8))
    side = {
        "minimum": smallest,
        "maximum": largest,
        "multipleOf": 8,
        "description": (
            f"Pixels, a multiple of 8, {smallest} to {largest}; width × height at most "
            f"{limits.max_pixels}. Absent: the model's default."
        ),
    }
    text = {"maxLength": limits.max_prompt_chars}
    items = {"maxItems": args.jobs.max_batch_items}
    return {
        "num_inference_steps": {"maximum": limits.max_steps},
        "steps": {"maximum": limits.max_steps},  # the refiner's and the hires pass's
        "n": {"maximum": limits.max_n},
        "prompt": text,
        "negative_prompt": text,
        "prompts": {"items": text, **items},
        "requests": items,
        "width": side,
        "height": side,
        "size": {"pattern": f"^(auto|({sides})x({sides}))$"},
        "model": {"enum": [args.model.name]},
        "loras": {"maxItems": limits.max_loras},
        # ids and names as listed; the server also takes other letter cases
        "scheduler": {"enum": sorted(set(SCHEDULERS) | set(SCHEDULERS.values()))},
    }


def _one_control_part(prop: dict) -> None:
    """A form's `controlnet` is one part: its schema states the one-object form (a JSON list in
    that part is accepted too, but a schema's array would read as repeated parts)."""
    for branch in prop.get("anyOf", [prop]):
        if "oneOf" in branch:
            (one,) = [choice for choice in branch.pop("oneOf") if choice.get("type") != "array"]
            branch.update(one)


def _name_served_controlnets(node: Any, names: list[str]) -> None:
    """Every ControlNet object's `name` (the JSON bodies' component and the forms' inlined
    copies) lists the served ControlNets; with none served, `controlnet` can only be null."""
    if isinstance(node, dict):
        properties = node.get("properties") or {}
        if "conditioning_scale" in properties and "name" in properties:
            if names:
                properties["name"]["enum"] = names
            else:
                properties["name"]["not"] = {}
        for value in node.values():
            _name_served_controlnets(value, names)
    elif isinstance(node, list):
        for value in node:
            _name_served_controlnets(value, names)


def _no_refiner(node: Any) -> None:
    """With no refiner served, every `refiner` field can only be null (else a 400 `refiner_not_served`)."""
    if isinstance(node, dict):
        properties = node.get("properties") or {}
        if "refiner" in properties:
            properties["refiner"] = {"type": "null", "description": "No refiner is served here: leave it out."}
        for value in node.values():
            _no_refiner(value)
    elif isinstance(node, list):
        for value in node:
            _no_refiner(value)


def _constrain_properties(node: Any, constraints: dict[str, dict[str, Any]]) -> None:
    if isinstance(node, dict):
        for name, prop in (node.get("properties") or {}).items():
            if name in constraints:
                _constrain(prop, constraints[name])
        for value in node.values():
            _constrain_properties(value, constraints)
    elif isinstance(node, list):
        for value in node:
            _constrain_properties(value, constraints)


def _constrain(prop: dict, keywords: dict[str, Any]) -> None:
    """Add keywords to a property's non-null schema (inside `anyOf` when it is nullable)."""
    description = keywords.get("description")
    keywords = {k: v for k, v in keywords.items() if k != "description"}
    targets = [branch for branch in prop.get("anyOf", []) if branch.get("type") != "null"] or [prop]
    for target in targets:
        for key, value in keywords.items():
            if isinstance(value, dict):
                target.setdefault(key, {}).update(value)
            else:
                target[key] = value
    if description:
        prop["description"] = description


def _drop_422(schema: dict) -> None:
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)


def _as_form(node: Any, files: bool = True) -> Any:
    """The multipart form of a JSON body schema: `anyOf: [X, null]` is X, no default is null,
    and base64 images (`format: byte`) are file parts (`format: binary`) — except inside
    `controlnet`, a JSON text part whose images stay base64."""
    if isinstance(node, dict):
        if node.get("format") == "byte" and files:
            node["format"] = "binary"
        branches = node.get("anyOf")
        if branches and any(branch.get("type") == "null" for branch in branches):
            rest = [branch for branch in branches if branch.get("type") != "null"]
            node.pop("anyOf")
            if len(rest) == 1:
                node.update(rest[0])
            else:
                node["anyOf"] = rest
        if node.get("default", 0) is None:
            node.pop("default")
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                for name, prop in value.items():
                    if name == "controlnet":
                        _one_control_part(prop)
                    _as_form(prop, files and name != "controlnet")
            else:
                _as_form(value, files)
    elif isinstance(node, list):
        for value in node:
            _as_form(value, files)
    return node
