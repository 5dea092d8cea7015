"""`LoraTrainer`: fine-tune a LoRA on a set of captioned images, one optimisation step at a time.

SDXL's objective on the served model's own noise schedule (as `training/train_tiny.py` trains the
tiny family): VAE latents of each example (sampled from their distribution every step), noise
plus a little offset noise at a uniform timestep, the UNet's prediction against its target
(epsilon or v, as the scheduler says), min-SNR weights (Hang et al. 2023, gamma 5). PEFT LoRAs on
the UNet's attention, feed-forward and projection layers, and optionally on both text encoders'
attention; AdamW on the LoRA weights only, kept in float32.

The trainer runs on a pipeline of its own (`load`: the served spec without speed switches, so
no compiled graph, fused projection or LoRA slot layer of the serving pipeline is touched), and
is stepped by the engine's loop when it has no request (`training_queue.TrainingQueue`).

Checkpoints are plain data (no pickles): the LoRA and the optimizer's moments as safetensors, and
a versioned JSON of the step, the loss and the generator's state; a trainer built on a folder with
a checkpoint of the same settings continues from it and ends with the same weights as a run that
never stopped. Knows torch, diffusers and peft; never Ray or HTTP.
"""

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from configs.paths import private_dir, write_private
from deployments.training import LoraTrainingSettings, TrainingExample

#: UNet layers the LoRA trains (PEFT's suffix match): attention, feed-forward, the transformer
#: blocks' in/out projections, the resnets' convolutions — the tiny family's pastel LoRA's set.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
#: Text-encoder layers (`train_text_encoder`): both CLIP encoders' attention.
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
#: Offset noise (a per-channel constant added to the noise): lets the model move an image's mean
#: colour, which a LoRA of a palette or lighting style needs; SDXL's fine-tuners use 0.03-0.1.
NOISE_OFFSET = 0.05
MIN_SNR_GAMMA = 5.0
WARMUP_STEPS = 10
CHECKPOINT_VERSION = 1
_ADAPTER = "default"


class LoraTrainer:
    """One training run. `step()` runs one optimisation step; `export()` writes the LoRA."""

    def __init__(
        self,
        load: Callable[[], StableDiffusionXLPipeline],
        settings: LoraTrainingSettings,
        examples: list[TrainingExample],
        checkpoint_dir: Optional[Path] = None,
    ):
        """`load()`: a fresh pipeline of the served model (this trainer's own). `settings` are
        resolved (`with_defaults`). `checkpoint_dir`: where `checkpoint()` writes, and where a
        checkpoint of the same settings is resumed from."""
        check_examples(settings, examples)
        self.settings = settings
        self.checkpoint_dir = checkpoint_dir
        # 1. The pipeline: frozen, with LoRA layers added to what trains.
        self.pipe = pipe = load()
        self.device, self.dtype = pipe.unet.device, pipe.unet.dtype
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            module.requires_grad_(False)
        torch.manual_seed(settings.seed)  # PEFT draws the LoRA A matrices from torch's global generator
        self._trained = {"unet": pipe.unet}
        if settings.train_text_encoder:
            self._trained |= {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
        for name, module in self._trained.items():
            _add_lora(module, settings.rank, UNET_TARGETS if name == "unet" else TEXT_TARGETS)
        self.params = [p for module in self._trained.values() for p in module.parameters() if p.requires_grad]
        for param in self.params:  # float32 weights and moments under a half-precision model
            param.data = param.data.float()
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.learning_rate, weight_decay=1e-2)
        # fp16 gradients underflow without a scale; bf16 and fp32 need none.
        self._scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        # 2. The examples, encoded once: latent distributions, token ids, and (text encoders
        #    frozen) the prompt embeddings.
        self._latent_mean, self._latent_std = self._encode_images(examples)
        self._ids = [self._tokenize(tokenizer, [settings.caption(e.caption) for e in examples]) for tokenizer in (pipe.tokenizer, pipe.tokenizer_2)]
        self._embeds = None if settings.train_text_encoder else self._encode_text(range(len(examples)))
        side = float(settings.resolution)
        self._time_ids = torch.tensor([[side, side, 0.0, 0.0, side, side]], device=self.device, dtype=self.dtype)
        # 3. The run's state: resumed from a checkpoint when there is one.
        self.generator = torch.Generator(self.device).manual_seed(settings.seed)
        self.step_index = 0
        self.loss: Optional[float] = None
        self.resumed_from = self._resume()
        self.started_at = time.perf_counter()
        self._steps_this_run = 0

    # -- training ------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.step_index >= self.settings.steps

    def step(self) -> float:
        """One optimisation step on the next batch; returns its loss."""
        for module in self._trained.values():
            module.train()
        rows = self._batch_rows(self.step_index)
        for group in self.optimizer.param_groups:
            group["lr"] = self.settings.learning_rate * min(1.0, (self.step_index + 1) / WARMUP_STEPS)
        loss = self._loss(rows)
        self.optimizer.zero_grad(set_to_none=True)
        self._scaler.scale(loss).backward()
        self._scaler.step(self.optimizer)
        self._scaler.update()
        self.step_index += 1
        self._steps_this_run += 1
        value = float(loss.detach())
        # The reported loss is smoothed: one step's is mostly the timestep drawn.
        self.loss = value if self.loss is None else 0.9 * self.loss + 0.1 * value
        return value

    def eta_s(self) -> Optional[float]:
        """Seconds of training left at this run's pace (stepping time only)."""
        if not self._steps_this_run:
            return None
        per_step = (time.perf_counter() - self.started_at) / self._steps_this_run
        return per_step * (self.settings.steps - self.step_index)

    def _batch_rows(self, step: int) -> torch.Tensor:
        """The examples of step `step`: epochs of a seeded permutation, the same on every resume."""
        count, batch = len(self._latent_mean), self.settings.batch_size
        rows = []
        for position in range(step * batch, (step + 1) * batch):
            epoch, index = divmod(position, count)
            order = torch.randperm(count, generator=torch.Generator().manual_seed(self.settings.seed + epoch))
            rows.append(int(order[index]))
        return torch.tensor(rows)

    def _loss(self, rows: torch.Tensor) -> torch.Tensor:
        generator, device = self.generator, self.device
        mean, std = self._latent_mean[rows], self._latent_std[rows]
        latents = (mean + std * torch.randn(mean.shape, generator=generator, device=device)) * self.pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator, device=device)
        noise = noise + NOISE_OFFSET * torch.randn(*latents.shape[:2], 1, 1, generator=generator, device=device)
        total = self.noise_scheduler.config.num_train_timesteps
        steps = torch.randint(0, total, (len(rows),), generator=generator, device=device)
        noisy = self.noise_scheduler.add_noise(latents, noise, steps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, steps)
        else:
            target = noise
        embeds, pooled = self._encode_text(rows) if self._embeds is None else (self._embeds[0][rows], self._embeds[1][rows])
        added = {"text_embeds": pooled, "time_ids": self._time_ids.expand(len(rows), -1)}
        predicted = self.pipe.unet(noisy.to(self.dtype), steps, embeds, added_cond_kwargs=added).sample
        per_item = F.mse_loss(predicted.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (per_item * self._min_snr_weights(steps)).mean()

    def _min_snr_weights(self, steps: torch.Tensor) -> torch.Tensor:
        alphas = self.noise_scheduler.alphas_cumprod.to(self.device)[steps]
        snr = alphas / (1 - alphas)
        weights = snr.clamp(max=MIN_SNR_GAMMA)
        return weights / (snr + 1) if self.noise_scheduler.config.prediction_type == "v_prediction" else weights / snr

    # -- the examples --------------------------------------------------------------------------

    @torch.no_grad()
    def _encode_images(self, examples: list[TrainingExample]) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.pipe.vae
        means, stds = [], []
        for example in examples:  # one at a time: bounded memory at any resolution
            pixels = torch.from_numpy(example.image).permute(2, 0, 1)[None].to(self.device, vae.dtype) / 127.5 - 1
            dist = vae.encode(pixels).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        return torch.cat(means), torch.cat(stds)

    def _tokenize(self, tokenizer: Any, captions: list[str]) -> torch.Tensor:
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids.to(self.device)

    def _encode_text(self, rows: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's prompt embeddings: both encoders' penultimate hidden states, pooled from the
        second (as `StableDiffusionXLPipeline.encode_prompt`); with gradients when they train."""
        rows = torch.as_tensor(list(rows))
        with torch.set_grad_enabled(self.settings.train_text_encoder):
            first = self.pipe.text_encoder(self._ids[0][rows], output_hidden_states=True)
            second = self.pipe.text_encoder_2(self._ids[1][rows], output_hidden_states=True)
        embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return embeds.to(self.dtype), second.text_embeds.to(self.dtype)

    # -- checkpoints and the result ------------------------------------------------------------

    def checkpoint(self) -> None:
        """Write the run's state to `checkpoint_dir` (the JSON last: a checkpoint is whole once its
        JSON names its step)."""
        folder = private_dir(self.checkpoint_dir)
        save_file({f"{i}": p.detach().contiguous().cpu() for i, p in enumerate(self.params)}, str(folder / "lora.safetensors"))
        moments = {}
        for i, param in enumerate(self.params):
            state = self.optimizer.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in state:
                    moments[f"{i}.{key}"] = torch.as_tensor(state[key]).detach().contiguous().cpu()
        save_file(moments, str(folder / "optimizer.safetensors"))
        save_file({"generator": self.generator.get_state(), "scaler": torch.tensor([self._scaler.get_scale()])}, str(folder / "rng.safetensors"))
        state = {"version": CHECKPOINT_VERSION, "settings": self.settings.model_dump(mode="json"), "step": self.step_index, "loss": self.loss}
        write_private(folder / "state.json", json.dumps(state).encode())

    def _resume(self) -> int:
        """Continue from `checkpoint_dir`'s checkpoint when it is of these settings; the step
        resumed from (0: none)."""
        path = None if self.checkpoint_dir is None else self.checkpoint_dir / "state.json"
        if path is None or not path.is_file():
            return 0
        state = json.loads(path.read_text())
        if state.get("version") != CHECKPOINT_VERSION or state.get("settings") != self.settings.model_dump(mode="json"):
            return 0  # another run's folder: start afresh (and overwrite it at the first checkpoint)
        weights = load_file(str(self.checkpoint_dir / "lora.safetensors"), device=str(self.device))
        moments = load_file(str(self.checkpoint_dir / "optimizer.safetensors"), device=str(self.device))
        rng = load_file(str(self.checkpoint_dir / "rng.safetensors"))
        with torch.no_grad():
            for i, param in enumerate(self.params):
                param.copy_(weights[str(i)])
                if f"{i}.exp_avg" in moments:
                    self.optimizer.state[param] = {
                        "step": moments[f"{i}.step"].cpu(),
                        "exp_avg": moments[f"{i}.exp_avg"],
                        "exp_avg_sq": moments[f"{i}.exp_avg_sq"],
                    }
        self.generator.set_state(rng["generator"])
        if self._scaler.is_enabled():
            self._scaler.update(float(rng["scaler"][0]))
        self.step_index, self.loss = state["step"], state["loss"]
        return self.step_index

    def export(self, path: Path) -> None:
        """The LoRA as the registry loads it: diffusers' `save_lora_weights` layout, PEFT key names
        (`unet.…lora_A.weight`), alpha = rank."""
        layers = {f"{name}_lora_layers": _lora_layers(module) for name, module in self._trained.items()}
        StableDiffusionXLPipeline.save_lora_weights(
            path.parent, weight_name=path.name, safe_serialization=True,
            unet_lora_layers=layers["unet_lora_layers"],
            text_encoder_lora_layers=layers.get("text_encoder_lora_layers"),
            text_encoder_2_lora_layers=layers.get("text_encoder_2_lora_layers"),
        )


def check_examples(settings: LoraTrainingSettings, examples: list[TrainingExample]) -> None:
    """`ValueError` quoting what does not fit (the HTTP side has checked each already)."""
    if settings.resolution is None or settings.seed is None:
        raise ValueError(f"settings {settings!r} are not resolved; call with_defaults first")
    if not examples:
        raise ValueError("no examples to train on")
    side = settings.resolution
    for index, example in enumerate(examples):
        if example.image.shape != (side, side, 3) or example.image.dtype != np.uint8:
            raise ValueError(f"example {index} is {example.image.dtype} {example.image.shape}, not uint8 ({side}, {side}, 3)")


def _add_lora(module: torch.nn.Module, rank: int, targets: list[str]) -> None:
    """PEFT LoRA layers (A drawn, B zero: the model starts unchanged) on `targets`. Injected with
    PEFT directly, not through diffusers' or transformers' `add_adapter`, whose PEFT version pins
    differ (transformers 5.17 asks for peft ≥ 0.22 there)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)
    inject_adapter_in_model(config, module, adapter_name=_ADAPTER)


def _lora_layers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's LoRA weights under PEFT's saved names (`…q_proj.lora_A.weight`)."""
    marker = f".{_ADAPTER}."
    return {
        key.replace(marker, "."): tensor.detach().float().contiguous().cpu()
        for key, tensor in module.state_dict().items()
        if ".lora_A." in key or ".lora_B." in key
    }
