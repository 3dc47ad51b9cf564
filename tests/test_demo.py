"""The README's demo runs end to end and agrees with the official math."""

from vlmo_fast import demo


def test_demo_runs(capsys):
    assert demo.main(["--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "worst relative error" in out and "infer_image_ft" in out
