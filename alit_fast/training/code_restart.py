"""Re-initialise unused codes of the ALIT latent quantizer from recent encoder outputs.

Not in the official recipe, which trains for 200 ImageNet epochs. In a short run the cosine VQ
collapses early onto a handful of codes, and then almost no information reaches the decoder
(its loss is the same at every iteration). Moving each code that went unused for ``window``
steps onto a latent the encoder just produced keeps the codebook in use. Everything here is
deterministic given the run's seed and is saved with the checkpoint, so resuming stays exact.

Between restarts it reads nothing back from the device: code usage is recorded on the device
and only the last step's latents are kept (there). A restart step (every ``window`` steps) reads
which codes are dead, once.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..models import LatentQuantizer

class DeadCodeRestarter:
    def __init__(self, quantizer: LatentQuantizer, window: int, seed: int) -> None:
        self.quantizer = quantizer
        self.window = window
        weight = quantizer.embedding.weight
        self.last_used = torch.zeros(weight.shape[0], dtype=torch.long, device=weight.device)
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        self._samples: list[torch.Tensor] = []
        self._hook = quantizer.register_forward_hook(self._record)

    def _record(self, module, inputs, out) -> None:
        if not module.training:
            return
        used = out.indices.detach().flatten()
        if self.last_used.device != used.device:
            self.last_used = self.last_used.to(used.device)
        self.last_used.index_fill_(0, used, self.step + 1)  # on the device: no sync
        self._samples.append(out.z.detach().reshape(-1, out.z.shape[-1]).float())

    @torch.no_grad()
    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Call once per optimizer step (on every rank). Returns the indices of the moved codes."""
        self.step = step
        recorded, self._samples = self._samples, []
        none = torch.zeros(0, dtype=torch.long)
        if self.window <= 0 or step % self.window or not recorded:
            return none
        samples = torch.cat(recorded)
        distributed = dist.is_available() and dist.is_initialized()
        weight = self.quantizer.embedding.weight
        if distributed:
            dist.all_reduce(self.last_used, op=dist.ReduceOp.MAX)
        dead = (step - self.last_used >= self.window).nonzero().flatten().cpu()  # the restart step's one read
        if len(dead) == 0:
            return none
        samples = samples.cpu()
        pick = torch.randint(0, samples.shape[0], (len(dead),), generator=self.generator)
        noise = 0.01 * torch.randn(len(dead), samples.shape[1], generator=self.generator)
        new = (samples[pick] + noise).to(weight.device, weight.dtype)
        if distributed:
            dist.broadcast(new, src=0)  # every rank takes rank 0's draws
        weight[dead.to(weight.device)] = new
        state = optimizer.state.get(weight)
        if state:  # stale Adam moments would push the moved codes straight back
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][dead.to(weight.device)] = 0
        self.last_used[dead.to(self.last_used.device)] = step
        return dead

    def state_dict(self) -> dict:
        return {"last_used": self.last_used.cpu().clone(), "generator": self.generator.get_state(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.last_used = state["last_used"].clone().to(self.last_used.device)
        self.generator.set_state(state["generator"])
        self.step = state["step"]
