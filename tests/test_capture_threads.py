"""Capturing a new call signature while other threads run forward passes on other signatures."""
from __future__ import annotations

import threading

import torch

import fxpeft
import models


def test_first_call_with_labels_does_not_disturb_calls_in_other_threads():
    model = models.llama().eval()
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).eval()
    inputs = models.hf_inputs("llama")
    with torch.no_grad():
        expected = gm(**inputs).logits
    failures, results, started, stop = [], [], threading.Event(), threading.Event()

    def run_forward_passes():
        try:
            with torch.no_grad():
                while not stop.is_set():
                    results.append(gm(**inputs).logits)
                    started.set()
        except BaseException as error:  # any error in this thread fails the test
            failures.append(error)
            started.set()

    workers = [threading.Thread(target=run_forward_passes) for _ in range(2)]
    for worker in workers:
        worker.start()
    started.wait(60)
    try:
        with torch.no_grad():
            loss = gm(**inputs, labels=inputs["input_ids"]).loss  # captured (torch.export) meanwhile
    finally:
        stop.set()
        for worker in workers:
            worker.join(60)
    assert not failures, failures
    assert results
    for logits in results:
        assert type(logits) is torch.Tensor  # never a FakeTensor from the capture
        torch.testing.assert_close(logits, expected)
    reference = torch.nn.functional.cross_entropy(expected[:, :-1].reshape(-1, expected.shape[-1]),
                                                  inputs["input_ids"][:, 1:].reshape(-1))
    torch.testing.assert_close(loss, reference)


def test_two_modules_captured_in_two_threads_at_once():
    """Both captures succeed (torch.export is not thread-safe: both failed, with errors blaming the
    example inputs), and torch.fx's per-node stack traces, which capture turns off while it exports (a
    module-level flag, not a scoped config), are the caller's setting again after."""
    config = torch.fx.config
    before = config.do_not_emit_stack_traces
    try:
        for setting in (False, True):
            config.do_not_emit_stack_traces = setting
            failures, barrier = [], threading.Barrier(2)

            def capture():
                try:
                    barrier.wait()
                    fxpeft.transform(models.MLP(), fxpeft.LoraConfig(r=2, target_modules=["fc1"]),
                                     example_inputs=(torch.randn(3, 12),))
                except BaseException as error:  # any error in this thread fails the test
                    failures.append(error)

            threads = [threading.Thread(target=capture) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert not failures, failures
            assert config.do_not_emit_stack_traces is setting
    finally:
        config.do_not_emit_stack_traces = before
