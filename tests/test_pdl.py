"""When engine kernels launch with programmatic dependent launch (engine/pdl.py): the rule, without a GPU."""
import pytest
import torch

from batchdeck.engine import pdl


@pytest.fixture(autouse=True)
def fresh_rule(monkeypatch):
    monkeypatch.setattr(pdl, "_LAUNCH", {})


def test_off_the_gpu_kernels_launch_without_it(monkeypatch):
    monkeypatch.delenv("BATCHDECK_PDL", raising=False)
    assert pdl.pdl_launch(torch.device("cpu")) == {}


def test_a_bad_switch_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("BATCHDECK_PDL", "yes")
    with pytest.raises(ValueError, match=r"BATCHDECK_PDL='yes': allowed 0 \(off\) or 1"):
        pdl.pdl_launch(torch.device("cpu"))


def test_on_hopper_it_is_on_unless_switched_off(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delenv("BATCHDECK_PDL", raising=False)
    assert pdl.pdl_launch(torch.device("cuda", 0)) == {"USE_PDL": True, "launch_pdl": True}
    monkeypatch.setattr(pdl, "_LAUNCH", {})
    monkeypatch.setenv("BATCHDECK_PDL", "0")
    assert pdl.pdl_launch(torch.device("cuda", 0)) == {}
    monkeypatch.setattr(pdl, "_LAUNCH", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setenv("BATCHDECK_PDL", "1")
    assert pdl.pdl_launch(torch.device("cuda", 0)) == {}  # before Hopper: no griddepcontrol
