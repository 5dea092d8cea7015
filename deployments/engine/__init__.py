"""The step-level engine: owns the denoising loop, so requests join and leave a running batch
between steps. Knows torch and diffusers components; never Ray, never HTTP.

- `control.py`: what the caller holds of a request in flight (cancel, deadline, progress, outcome);
- `sharing.py`: the one rule of which rows may share a UNet forward;
- `calls.py`: splitting a forward (or a decode) into calls of the compiled batch sizes;
- `rows.py`: one request's denoising state, prepared with diffusers' own pipeline helpers;
- `loop.py`: `StepEngine`, the admit → forward → advance → retire loop;
- `factory.py`: building an engine from a model spec (the pipeline factory is injected).
"""
