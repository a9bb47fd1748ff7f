"""What the run folder keeps, and when it is written.

- `last.ckpt`: everything to resume (optimizer, GradScaler, schedule, every rank's RNG), written
  every `save_every` steps, at the end and on a stop signal. The only file with optimizer state.
- `step=NNNNNN.ckpt`: lean (the model in the SD layout, fp16 weights unless `lean_fp16=false`),
  at the same save points but not on a stop signal; the newest `keep_last` are kept. With
  `full_state_steps` they are full training checkpoints instead.
- `best.ckpt`: lean, the weights of the lowest validation loss. A new best is not written when it
  is found (with validation every 100 steps that would be a file per improvement): it becomes a
  hard link to the step checkpoint of its step when there is one, which writes nothing, and is
  otherwise kept in host memory (the trained weights only) and written at the next save point.
- While steps are non-finite nothing is written, except at the end, so the newest checkpoint is
  one saved at a finite state, the "last good checkpoint" a non-finite stop names.
- A LoRA run's files hold the merged weights in `state_dict` and its adapters in `lora`
  (ldm/train/lora.py); a best between save points keeps its adapters in host memory.

For full-size SD v1 (fp32 weights 4.26 GB, AdamW moments of the UNet 6.88 GB) a full checkpoint
is ~11.1 GB and a lean fp16 one ~2.1 GB; README "Run folder" has the measured totals.
"""

import os
from dataclasses import asdict
from pathlib import Path

import torch

from ldm.checkpoint import half_precision, save_checkpoint
from ldm.train.lora import adapter_entry, fold, is_peft_key, with_lora
from ldm.train.state import RunDir, checkpoint_payload, lean_payload, save_step


class RunCheckpoints:
    """Writes the run folder's checkpoints for the loop (rank 0)."""

    def __init__(self, run: RunDir, cfg, frozen_state: dict, good: tuple[Path, int] | None):
        self.run, self.cfg = run, cfg
        self.frozen_state = frozen_state  # the frozen weights as loaded, saved bitwise
        self.best_step: int | None = None  # a best not yet in best.ckpt
        self.best_weights: dict | None = None  # its trained tensors, if not the live weights
        self.best_lora: dict | None = None  # and a LoRA run's adapters
        self.good = good  # (path, step) of the newest checkpoint saved at a finite state

    def new_best(self, session, saved_now: bool) -> None:
        """Note a new best validation loss at this step. Unless this step is saved right away,
        copy its trained weights (not the frozen ones, which never change) to host memory."""
        self.best_step = session.state.step
        self.best_weights = self.best_lora = None
        if not saved_now:
            half = self.cfg.train.lean_fp16
            self.best_weights = {
                k: (half_precision(k, v) if half else v).to("cpu", copy=True)
                for k, v in session.model.state_dict().items()
                if k not in self.frozen_state and not is_peft_key(k)
            }
            self.best_lora = adapter_entry(session.model, session.ema, session.text_ema)

    def save(self, session, numbered: bool, rng: list) -> None:
        """last.ckpt; step=N.ckpt when `numbered`; then a pending best."""
        s, tc = session, self.cfg.train
        state = asdict(s.state)
        model_state, lora = self._model_state(session)
        full = checkpoint_payload(
            model_state, s.optimizer, s.scaler, s.scheduler, s.text_ema, self.cfg, state, rng
        )
        full = with_lora(full, lora)
        save_checkpoint(full, self.run.last)
        step_is_lean = False
        if numbered:
            payload = full if tc.full_state_steps else self._lean(model_state, state, lora)
            save_step(self.run, payload, s.state.step, tc.keep_last)
            step_is_lean = not tc.full_state_steps
        if s.state.nonfinite_run == 0:
            self.good = (self.run.last, s.state.step)
        if self.best_step is not None:
            self._write_best(session, model_state, lora, state, linkable=step_is_lean)

    def _write_best(self, session, model_state: dict, lora, state: dict, linkable: bool) -> None:
        step = session.state.step
        if self.best_step == step and linkable:
            _link(self.run.step_path(step), self.run.best)
        elif self.best_step == step:
            save_checkpoint(self._lean(model_state, state, lora), self.run.best)
        else:
            weights = {**self.frozen_state, **self.best_weights}
            best_lora = fold(weights, self.best_lora)
            best_state = {**state, "step": self.best_step}
            save_checkpoint(self._lean(weights, best_state, best_lora), self.run.best)
        self.best_step = self.best_weights = self.best_lora = None

    def _lean(self, weights: dict, state: dict, lora: dict | None) -> dict:
        half = self.cfg.train.lean_fp16
        return with_lora(lean_payload(weights, self.cfg, state, half=half), lora, half=half)

    def _model_state(self, session) -> tuple[dict, dict | None]:
        """The SD-layout state dict and, for a LoRA run, its checkpoint entry."""
        state = session.model.state_dict()
        state.update(self.frozen_state)  # the frozen weights as loaded, bitwise
        return state, fold(state, adapter_entry(session.model, session.ema, session.text_ema))


def _link(source: Path, target: Path) -> None:
    """`target` becomes another name of `source` (atomically); a copy where links fail."""
    tmp = target.with_name(f".{target.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # a filesystem without hard links
        save_checkpoint(torch.load(source, map_location="cpu", weights_only=True), tmp)
    os.replace(tmp, target)
