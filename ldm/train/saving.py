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
- With `train.async_save` (default: on CUDA) a save point before the last copies what it writes
  to host memory and a background thread writes it while training goes on; the next save point
  (the end's and a stop signal's are written in the loop) and a non-finite stop wait for it
  first (and raise its error). It costs a host copy of one full checkpoint; the files and
  their order are the same as written in the loop.

For full-size SD v1 (fp32 weights 4.26 GB, AdamW moments of the UNet 6.88 GB) a full checkpoint
is ~11.1 GB and a lean fp16 one ~2.1 GB; README "Run folder" has the measured totals.
"""

import os
import threading
from dataclasses import asdict
from pathlib import Path

import torch

from ldm.checkpoint import half_precision, save_checkpoint, tensor_bytes
from ldm.train.lora import adapter_entry, fold, is_peft_key, with_lora
from ldm.train.state import RunDir, checkpoint_payload, lean_payload, save_step


class RunCheckpoints:
    """Writes the run folder's checkpoints for the loop (rank 0)."""

    def __init__(
        self,
        run: RunDir,
        cfg,
        frozen_state: dict,
        good: tuple[Path, int] | None,
        background: bool = False,
        message=print,
    ):
        self.run, self.cfg, self.background, self.message = run, cfg, background, message
        self.writer: threading.Thread | None = None  # a background write under way
        self.error: BaseException | None = None  # what it raised
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

    def save(self, session, numbered: bool, rng: list, final: bool = False) -> None:
        """last.ckpt; step=N.ckpt when `numbered`; then a pending best. In the background
        (after the previous write is done) when `background`, except the `final` save, which
        the run waits for anyway (a host copy would only add to it)."""
        self.wait()
        s, tc, step = session, self.cfg.train, session.state.step
        state = asdict(s.state)
        model_state, lora = self._model_state(session)
        full = checkpoint_payload(
            model_state, s.optimizer, s.scaler, s.scheduler, s.text_ema, self.cfg, state, rng
        )
        full = with_lora(full, lora)
        step_file = None
        if numbered:
            step_file = full if tc.full_state_steps else self._lean(model_state, state, lora)
        best = self._best(step, model_state, lora, state, link=numbered and not tc.full_state_steps)
        files = (full, step_file, best, step, s.state.nonfinite_run == 0)
        frozen = {id(t) for t in self.frozen_state.values()}  # never change: not copied
        if self.background and not final and not self._room_for_a_copy(files):
            self.background = False
        if not self.background or final:
            self._write(*files)
            return
        self.writer = threading.Thread(
            target=self._write_or_keep_error, args=host_copy(files, frozen), name="checkpoints"
        )
        self.writer.start()

    def _room_for_a_copy(self, files) -> bool:
        """Whether host memory holds a copy of `files` with half of it to spare; if not, say
        that save points are written in the loop from now on."""
        copied = tensor_bytes(files) - sum(t.nbytes for t in self.frozen_state.values())
        available = available_memory()
        if 2 * copied <= available:
            return True
        self.message(
            f"train.async_save: a host copy of the checkpoint ({copied / 2**30:.1f} GiB) would "
            f"leave too little of the {available / 2**30:.1f} GiB of free memory; saving in the "
            "loop instead"
        )
        return False

    def wait(self) -> None:
        """Until the background write is done; its error, if it had one, is raised here."""
        if self.writer is not None:
            self.writer.join()
            self.writer = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _write_or_keep_error(self, *files) -> None:
        try:
            self._write(*files)
        except BaseException as e:  # noqa: BLE001  (handed to the loop by wait())
            self.error = e

    def _write(self, full: dict, step_file: dict | None, best, step: int, finite: bool) -> None:
        save_checkpoint(full, self.run.last)
        if step_file is not None:
            save_step(self.run, step_file, step, self.cfg.train.keep_last)
        if finite:
            self.good = (self.run.last, step)
        if best is LINK:
            _link(self.run.step_path(step), self.run.best)
        elif best is not None:
            save_checkpoint(best, self.run.best)

    def _best(self, step: int, model_state: dict, lora, state: dict, link: bool):
        """What best.ckpt becomes at this save point: None (no new best), LINK (to the lean
        step file of this step) or a lean payload; the pending best is cleared."""
        if self.best_step is None:
            return None
        if self.best_step == step and link:
            best = LINK
        elif self.best_step == step:
            best = self._lean(model_state, state, lora)
        else:
            weights = {**self.frozen_state, **self.best_weights}
            best_lora = fold(weights, self.best_lora)
            best_state = {**state, "step": self.best_step}
            best = self._lean(weights, best_state, best_lora)
        self.best_step = self.best_weights = self.best_lora = None
        return best

    def _lean(self, weights: dict, state: dict, lora: dict | None) -> dict:
        half = self.cfg.train.lean_fp16
        return with_lora(lean_payload(weights, self.cfg, state, half=half), lora, half=half)

    def _model_state(self, session) -> tuple[dict, dict | None]:
        """The SD-layout state dict and, for a LoRA run, its checkpoint entry."""
        state = session.model.state_dict()
        state.update(self.frozen_state)  # the frozen weights as loaded, bitwise
        return state, fold(state, adapter_entry(session.model, session.ema, session.text_ema))


LINK = "link"  # best.ckpt as a hard link to the step file


def available_memory() -> int:
    """Bytes of host memory available to a new allocation (Linux's MemAvailable, which counts
    reclaimable page cache; elsewhere the free pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def host_copy(obj, keep: set[int]):
    """`obj` with every tensor copied to host memory, except those whose id is in `keep`:
    training may change the originals while a background thread writes the copy."""
    if isinstance(obj, torch.Tensor):
        return obj if id(obj) in keep else obj.to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, host_copy(v, keep)) for k, v in obj.items())  # OrderedDict stays
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v, keep) for v in obj)
    return obj


def _link(source: Path, target: Path) -> None:
    """`target` becomes another name of `source` (atomically); a copy where links fail."""
    tmp = target.with_name(f".{target.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # a filesystem without hard links
        save_checkpoint(torch.load(source, map_location="cpu", weights_only=True), tmp)
    os.replace(tmp, target)
