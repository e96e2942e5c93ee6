"""A run's config.toml repeats the run: written by tomli_w, read back to the same Config; old keys still load."""

from scalelm.config import build_config, load_toml, to_toml


def test_config_toml_round_trips(tmp_path):
    cfg = build_config({}, {"model.preset": "tiny", "train.steps": "7", "out": 'runs/a "quoted" \\ dir',
                            "cpu.matmul": "blas", "optim.lr": "1e-3"})
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    again = build_config(load_toml(path))
    assert again == cfg
    assert again.out == 'runs/a "quoted" \\ dir'  # escaped by the TOML writer, not by hand


def test_keys_that_moved_to_the_cpu_section_still_load():
    cfg = build_config({"train.cpu_attention": "sdpa", "train.cpu_matmul": "onednn", "train.keep_host_memory": False})
    assert (cfg.cpu.kernels, cfg.cpu.matmul, cfg.cpu.keep_host_memory) == (False, "onednn", False)
    assert build_config({"train.cpu_attention": "auto"}).cpu.kernels is True
