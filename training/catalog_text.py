"""The catalogue's text inputs while the text encoder is fine-tuned.

With ``text_trainable_layers=N`` every training step re-encodes its targets' and hard
negatives' texts through the top N layers, with gradients. The layers below never change,
so their output for the whole catalogue is computed once and each step slices it (above
``FROZEN_STATES_MAX_BYTES`` it is recomputed per batch instead, without gradients); the
other products of a step (the histories) read the catalogue's text vectors as of the start
of the epoch. ``CatalogText`` keeps both, on the training device.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from training.text import TrainableTextEncoder, length_batches, token_lengths

log = logging.getLogger(__name__)

# Keep the frozen layers' hidden states of the whole catalogue (N x T x H) up to this size;
# above it the frozen layers run again, without gradients, for each batch's texts.
FROZEN_STATES_MAX_BYTES = 2 * 2**30


class CatalogText:
    """The catalogue's text inputs while the text encoder is fine-tuned.

    Holds the token ids (N, T), the frozen layers' hidden states (N, T', H) when they fit
    ``FROZEN_STATES_MAX_BYTES`` (T' the longest text's tokens), and the current text
    vectors (N, H), recomputed lazily after the encoder changed (``mark_stale``). Batches
    are cut to their longest text (``token_lengths``).

    Args:
        encoder: the model's trainable text encoder (on ``device``).
        tokens: ids and attention mask, (N, T) int32 each.
        device: where everything lives.
        amp: autocast dtype (CUDA), or None.
        batch_size: texts per encoder forward pass.
    """

    def __init__(
        self,
        encoder: TrainableTextEncoder,
        tokens: tuple[np.ndarray, np.ndarray],
        device: torch.device,
        amp: torch.dtype | None,
        batch_size: int,
    ):
        self.lengths = token_lengths(torch.from_numpy(tokens[1]))  # (N,) on the CPU
        length = int(self.lengths.max()) if len(self.lengths) else 1
        self.ids = torch.from_numpy(tokens[0][:, :length]).to(device)  # (N, T') int32
        self.mask = torch.from_numpy(tokens[1][:, :length]).to(device)  # (N, T') int32
        self.device = device
        self.amp = amp
        self.batch_size = batch_size
        n = len(self.ids)
        dtype = amp or torch.float32
        size = n * length * encoder.dim * torch.finfo(dtype).bits // 8
        self.states: torch.Tensor | None = None
        if size <= FROZEN_STATES_MAX_BYTES:
            # Zeros past each text's end: padding, never attended to nor pooled.
            states = torch.zeros(n, length, encoder.dim, dtype=dtype, device=device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                for part, cut in length_batches(self.lengths, batch_size):
                    on = part.to(device)
                    states[on, :cut] = encoder.frozen_states(self.ids[on, :cut],
                                                             self.mask[on, :cut]).to(dtype)
            self.states = states  # (N, T', H)
        else:
            log.info("frozen text states of %d products would take %.1f GiB: recomputing "
                     "them per batch instead", n, size / 2**30)
        self._vectors: torch.Tensor | None = None

    def mark_stale(self) -> None:
        """The encoder changed: recompute the vectors when next asked."""
        self._vectors = None

    def vectors(self, encoder: TrainableTextEncoder) -> torch.Tensor:
        """Every product's text vector under the encoder as it is now: (N, H) float32."""
        if self._vectors is None:
            self._vectors = encoder.encode(self.ids, self.mask, states=self.states,
                                           batch_size=self.batch_size, autocast=self.amp)
        return self._vectors

    def inputs(self, rows: torch.Tensor, *, pin: bool = False) -> dict[str, torch.Tensor]:
        """The encoder inputs of catalogue ``rows`` (F,) on the CPU: mask and states (or
        ids), cut to the longest of these texts."""
        cut = int(self.lengths[rows].max())
        on = rows.pin_memory().to(self.device, non_blocking=True) if pin else rows.to(self.device)
        out = {"fresh_mask": self.mask[on, :cut]}  # (F, T'')
        if self.states is not None:
            out["fresh_states"] = self.states[on, :cut]  # (F, T'', H)
        else:
            out["fresh_ids"] = self.ids[on, :cut]  # (F, T'')
        return out
