"""Wrong command lines through the real CLI: each gives exit status 2 and one `error:` line naming the key, value or
file and what was expected, never a traceback."""
import pytest
import torch
from tests.conftest import SMOKE_HL

from tests.test_run import _cli

pytestmark = pytest.mark.slow

# name: (overrides, what the error line must contain)
BAD_COMMAND_LINES = {
    "unknown key": (["train.itres=3"], ["train.itres=3: the config has no key train.itres; did you mean train.iters?"]),
    # Hydra itself would add the key and run with it ignored.
    "unknown key added with +": (["+train.itres=3"], ["+train.itres=3: the config has no key train.itres"]),
    "unknown key added with ++": (["++hl.lamda=3"], ["++hl.lamda=3: the config has no key hl.lamda; did you mean "
                                                     "hl.lam?"]),
    "unknown nested key": (["hl.semisup.where=x"], ["hl.semisup.where"]),
    "wrong type": (["train.iters=many"], ["train.iters='many' is not valid; expected an integer >= 1"]),
    "value out of range": (["hl.lam=-1"], ["hl.lam=-1 is not valid; expected a number >= 0"]),
    "zero batch": (["train.batch_size=0"], ["train.batch_size=0 is not valid; expected an integer >= 1"]),
    "value not among the choices": (["hl.scope=pixel"], ["hl.scope='pixel' is not valid; expected one of"]),
    "bad-sample policy": (["data.on_bad_sample=ignore"], ["data.on_bad_sample='ignore'", "error, skip"]),
    "missing data root": (["data=cityscapes_769", "model.backbone.pretrained=none", "data.root=/nonexistent/cs"],
                          ["data.root=/nonexistent/cs: no such folder", "HLBENCH_DATA", "leftImg8bit/{train,val}"]),
    "unknown model": (["model=nosuch"], ["model/nosuch", "pspnet_r101"]),
    "unknown method": (["method=nosuch"], ["method/nosuch", "u2pl", "unimatch"]),
    "unknown split": (["data=cityscapes_semisup_769", "method=u2pl", "data.root={tmp}", "data.split=u2pl/1_3"],
                      ["data.split='u2pl/1_3' is neither a shipped split", "u2pl/1_16"]),
    "split lists on synthetic scenes": (["experiment=semisup_synthetic/suponly", "data.split=u2pl/1_8"],
                                        ["data.split='u2pl/1_8': synthetic scenes have no split lists"]),
    "experiment that does not exist": (["experiment=fullsup/nosuch"], ["experiment/fullsup/nosuch",
                                                                       "fullsup/pspnet_r101"]),
    "suite that does not exist": (["suite=nosuch"], ["nosuch", "smoke"]),
}


@pytest.mark.parametrize("case", BAD_COMMAND_LINES)
def test_a_wrong_command_line_is_one_error_line_without_a_traceback(tmp_path, case):
    overrides, named = BAD_COMMAND_LINES[case]
    res = _cli([o.format(tmp=tmp_path) for o in overrides] + ["logger=none"], tmp_path)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-2000:]
    assert all(part in errors[0] for part in named), errors[0]
    assert "Traceback" not in res.stderr and not list(tmp_path.glob("runs/*/*"))  # nothing was started
    assert not (tmp_path / "hydra").exists()  # nor a Hydra folder with an empty run.log


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(tmp_path):
    res = _cli([*SMOKE_HL, "device=cuda", "logger=none"], tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert "device=cuda" in line and "device=cpu" in line
    assert not (tmp_path / "runs").exists()
