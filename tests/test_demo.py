"""The README's demo runs end to end and agrees with the official math."""

from vlmo_fast import demo


def test_demo_runs(capsys):
    assert demo.main(["--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "worst relative error" in out and "infer_image_ft" in out


def test_demo_device_errors_are_one_line(capsys):
    import pytest
    import torch

    for argv in (["--device", "foo"], ["--device", f"cuda:{torch.cuda.device_count()}"]):  # malformed; absent
        with pytest.raises(SystemExit) as info:
            demo.main(argv, prog="vlmo-fast demo")
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and err[-1].startswith("vlmo-fast demo: error: ") and "device" in err[-1], err
