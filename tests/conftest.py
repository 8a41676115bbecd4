import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)



@pytest.fixture(scope="module")
def llama_pair():
    """PEFT and fxpeft Llama with the same two LoRA adapters of different ranks, "a" active."""
    import models
    from peft_oracle import two_adapters_pair
    torch.manual_seed(0)
    return two_adapters_pair(models.llama().eval())


@pytest.fixture(scope="module", params=["t5", "bart"])
def seq2seq_pair(request):
    """The same for T5 and BART, with inputs of three rows (row 0 padded)."""
    import models
    from peft_oracle import two_adapters_pair
    torch.manual_seed(0)
    return two_adapters_pair(getattr(models, request.param)().eval()) + (models.hf_inputs("bart", batch=3),)

class _FileProgress:
    """One line per test file as its last test ends, when the suite runs on several xdist workers
    (``.ci/run`` does): xdist's own output is a row of dots that names no file."""

    def __init__(self, config):
        self.config = config
        self.totals = {}
        self.done = {}
        self.failed = {}
        self.seconds = {}

    @staticmethod
    def _file(nodeid):
        return nodeid.split("::", 1)[0]

    def pytest_xdist_node_collection_finished(self, node, ids):
        if not self.totals:  # every worker collects the same ids
            for nodeid in ids:
                self.totals[self._file(nodeid)] = self.totals.get(self._file(nodeid), 0) + 1

    def pytest_runtest_logreport(self, report):
        path = self._file(report.nodeid)
        self.seconds[path] = self.seconds.get(path, 0.0) + report.duration
        if report.failed:
            self.failed[path] = self.failed.get(path, 0) + 1
        if report.when != "teardown":
            return
        self.done[path] = self.done.get(path, 0) + 1
        if self.done[path] == self.totals.get(path):
            failed = self.failed.get(path, 0)
            reporter = self.config.pluginmanager.get_plugin("terminalreporter")
            if reporter._tw.width_of_current_line:  # after xdist's dots
                reporter.write("\n")
            reporter.write_line(f"{path}: {self.done[path]} tests, {failed} failed, {self.seconds[path]:.0f} s",
                                red=bool(failed), green=not failed)


def pytest_configure(config):
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_FileProgress(config), "fxpeft-file-progress")
