"""Schedules in epochs (hlbench/epochs.py): iterations follow from the split's size as the references count them."""
import pytest

from hlbench.compose import compose
from hlbench.config_checks import check_config
from hlbench.epochs import iterations_per_epoch
from hlbench.errors import ConfigError


def test_an_epoch_is_a_pass_of_padded_per_gpu_shares():
    # 2789 images on 8 GPUs: each pads its share to 349 (DistributedSampler); in batches of 2, 174 full ones.
    assert iterations_per_epoch(2789, 8, 2, drop_last=True) == 174
    assert iterations_per_epoch(2789, 8, 2, drop_last=False) == 175
    assert iterations_per_epoch(186, 4, 4, drop_last=False) == 12  # 47 per GPU: 11 full batches and one of 3
    assert iterations_per_epoch(186, 4, 4, drop_last=True) == 11
    assert iterations_per_epoch(1488, 8, 1, drop_last=True) == 186


@pytest.mark.parametrize("experiment,iters,per_epoch", [
    # U2PL train_semi.py: 200 epochs of the 2789-image unlabeled list of 1/16, 8 GPUs x 2, drop_last.
    ("semisup/u2pl_1_16", 200 * 174, 174),
    # U2PL train_sup.py: 200 epochs of the 186 labeled images, 4 GPUs x 4, the last batch kept.
    ("semisup/suponly_1_16", 200 * 12, 12),
    # UniMatch unimatch.py: 240 epochs of the 2603-image unlabeled list of 1/8, 8 GPUs x 1.
    ("semisup/unimatch_1_8", 240 * 326, 326),
    # UniMatch supervised.py: 240 epochs of the 1488 labeled images of 1/2, 8 GPUs x 1.
    ("semisup/unimatch_suponly_1_2", 240 * 186, 186),
])
def test_semisup_experiments_derive_their_schedule_from_the_split(hydra_ctx, experiment, iters, per_epoch):
    cfg = compose([f"experiment={experiment}"])
    assert (cfg.train.iters, cfg.train.eval_interval) == (iters, per_epoch)
    if cfg.method.name == "u2pl":
        assert cfg.method.epochs == cfg.train.epochs == 200  # the drop and EMA schedules span the run's epochs


def test_a_changed_split_list_changes_the_schedule(hydra_ctx, tmp_path):
    for name, count in (("labeled.txt", 20), ("unlabeled.txt", 100)):
        (tmp_path / name).write_text("".join(f"leftImg8bit/train/c/c_{name[0]}{i}_leftImg8bit.png\n"
                                             for i in range(count)))
    cfg = compose(["experiment=semisup/u2pl_1_16", f"data.split={tmp_path}"])
    assert (cfg.train.iters, cfg.train.eval_interval) == (200 * 6, 6)  # 13 per GPU, 6 full batches of 2


def test_an_epoch_schedule_without_a_split_is_one_line(hydra_ctx):
    cfg = compose(["experiment=semisup/u2pl_1_16", "data=cityscapes_769"])
    with pytest.raises(ConfigError, match=r"^train.iters: data.name='cityscapes' has no labeled / unlabeled split"):
        check_config(cfg)
    cfg = compose(["experiment=semisup/u2pl_1_16", "train.epoch.stream=both"])
    with pytest.raises(ConfigError, match=r"train.epoch.stream must be one of \('labeled', 'unlabeled'\)"):
        check_config(cfg)
