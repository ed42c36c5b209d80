"""The README's demo runs and reports agreement with the reference."""

from flexattn_jax import demo


def test_demo_runs_and_agrees_with_the_reference(capsys):
    demo.main(["--length", "256", "--heads", "2", "--head-dim", "16", "--block-size", "64"])
    printed = capsys.readouterr().out
    assert "causal" in printed and "ALiBi" in printed
    assert "(ok)" in printed
