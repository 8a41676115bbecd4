"""Inputs that share memory are captured as separate graph inputs."""
from __future__ import annotations

import torch

import fxpeft
import models


def test_signature_captured_with_labels_equal_to_input_ids_reads_later_labels():
    model = models.llama().eval()
    gm = fxpeft.transform(model, fxpeft.LoraConfig(target_modules=["q_proj"]))
    inputs = models.hf_inputs("llama")
    gm(**inputs, labels=inputs["input_ids"])  # the usual causal-LM call captures the labels signature
    other = torch.randint(1, models.VOCAB, inputs["input_ids"].shape)
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs, labels=other).loss, model(**inputs, labels=other).loss)
