"""Controllable anatomy size (reference §10): request rules, the size-condition vector, the channel → label map,
the DDPM mask loop and the post-processing steps."""

from __future__ import annotations

import numpy as np
import pytest

from maisi_cli.engine.masks.generation import (channels_to_labels, check_size_requests, closing,
                                               controlled_label_ids, largest_component, post_process,
                                               read_size_table, size_condition, target_tumour_label)
from maisi_cli.errors import UsageError


def test_request_rules():
    assert check_size_requests([("Liver", 0.5), ("lung tumor", 1.0)]) == [("liver", 0.5), ("lung tumor", 1.0)]
    assert check_size_requests([("colon", -1)]) == [("colon", -1.0)]
    with pytest.raises(UsageError, match="size control covers only"):
        check_size_requests([("spleen", 0.5)])
    with pytest.raises(UsageError, match="at most one tumour"):
        check_size_requests([("lung tumor", 0.5), ("bone lesion", 0.2)])
    with pytest.raises(UsageError, match=r"within \[0, 1\]"):
        check_size_requests([("liver", 1.5)])
    with pytest.raises(UsageError, match="named twice"):
        check_size_requests([("liver", 0.5), ("LIVER", 0.2)])
    with pytest.raises(UsageError, match="at most 10"):
        check_size_requests([("liver", 0.1)] * 11)


def test_size_condition_picks_the_nearest_row_and_overwrites_requested_entries():
    table = np.array([
        [0.1, 0.5, 0.5, 0.5, 0.5, -1, -1, -1, -1, -1],
        [0.2, 0.875, 0.4, 0.3, 0.6, 0.7, -1, -1, -1, -1],
        [0.3, 0.625, 0.1, 0.2, 0.6, -1, -1, 0.4, -1, -1],
    ])
    # liver 0.75: distances .25, .125, .125 → the first of the tie (row 1), whose lung tumour is inherited
    condition = size_condition([("liver", 0.75)], table)
    np.testing.assert_allclose(condition, [0.2, 0.75, 0.4, 0.3, 0.6, 0.7, -1, -1, -1, -1])
    # liver 0.625 + hepatic tumour 0.4: row 2 exactly
    condition = size_condition([("liver", 0.625), ("hepatic tumor", 0.4)], table)
    np.testing.assert_allclose(condition, table[2])
    assert target_tumour_label(condition) == 26
    assert target_tumour_label(table[0]) is None
    # the last non-(-1) tumour wins
    both = table[1].copy()
    both[9] = 0.5
    assert target_tumour_label(both) == 128
    assert controlled_label_ids([("liver", 0.5), ("colon", -1.0), ("hepatic tumor", 0.3)]) == [1, 26]


def test_size_table_errors(tmp_path):
    path = tmp_path / "sizes.json"
    path.write_text('[{"organ_size": [1, 2, 3]}]')
    with pytest.raises(Exception, match="10 numbers"):
        read_size_table(path)
    path.write_text('[{"sizes": []}]')
    with pytest.raises(Exception, match="organ_size"):
        read_size_table(path)
    path.write_text('[{"organ_size": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}]')
    assert read_size_table(path).shape == (1, 10)


def test_channels_map_to_label_ids():
    labels = channels_to_labels(np.array([0, 1, 2, 3, 124]))
    np.testing.assert_array_equal(labels, [0, 1, 3, 4, 200])  # background, liver, spleen, pancreas, body
    assert labels.dtype == np.uint8


def test_largest_component_uses_26_connectivity():
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[1:4, 1:4, 1:4] = True  # 27 voxels
    mask[4, 4, 4] = True  # touches the cube only at a corner: same component with 26-connectivity
    mask[7:9, 7:9, 7:9] = True  # 8 voxels, separate
    kept = largest_component(mask)
    assert kept.sum() == 28 and not kept[7:9, 7:9, 7:9].any()


def test_cropped_closing_equals_closing_the_whole_volume():
    import torch
    from monai.transforms.utils_morphological_ops import dilate, erode

    rng = np.random.default_rng(0)
    mask = np.zeros((40, 40, 40), dtype=bool)
    mask[5:20, 8:30, 10:25] = rng.random((15, 22, 15)) > 0.3
    mask[0:3, 0:4, 0:5] = True  # touches the border
    whole = torch.from_numpy(mask.astype(np.float32))[None, None]
    for _ in range(2):
        whole = erode(dilate(whole, 3, pad_value=0.0), 3, pad_value=0.0)
    np.testing.assert_array_equal(closing(mask), whole[0, 0].numpy() > 0.5)


def synthetic_generated_volume() -> np.ndarray:
    volume = np.zeros((48, 48, 48), dtype=np.uint8)
    volume[4:44, 4:44, 4:44] = 200
    volume[1, 1, 1] = 200  # a speck outside the body
    volume[10:22, 10:22, 10:22] = 1  # liver
    volume[30:32, 30:32, 30:32] = 1  # a stray liver piece
    volume[14:17, 14:17, 14:17] = 26  # hepatic tumour inside the liver
    volume[12:13, 18:20, 18:20] = 25  # hepatic vessel
    volume[26:36, 10:20, 26:36] = 28  # a lung lobe
    volume[29:31, 13:15, 29:31] = 23  # a lung tumour (not the target)
    return volume


def test_post_process_cleans_and_keeps_the_target_tumour():
    volume = synthetic_generated_volume()
    cleaned = post_process(volume, target_tumour=26)
    assert cleaned[1, 1, 1] == 0  # outside the one body
    assert cleaned[31, 31, 31] == 200  # stray liver component becomes body
    assert (cleaned == 26).sum() == 27  # target tumour kept
    assert not (cleaned == 23).any() and cleaned[30, 14, 30] == 28  # other tumour folded into its lobe
    assert not (cleaned == 25).any() and cleaned[12, 18, 18] == 1  # vessel drawn as liver
    assert cleaned.dtype == np.uint8 and cleaned.shape == volume.shape


def test_post_process_without_target_folds_every_tumour():
    cleaned = post_process(synthetic_generated_volume(), target_tumour=None)
    assert not np.isin(cleaned, [23, 24, 26, 27, 128]).any()
    assert cleaned[15, 15, 15] == 1  # the hepatic tumour is liver now


def test_mask_ddpm_loop_is_deterministic_and_uses_the_condition():
    import torch
    from monai.networks.nets.diffusion_model_unet import DiffusionModelUNet
    from monai.networks.schedulers import DDPMScheduler

    from maisi_cli.engine.masks.generation import sample_mask_latents
    from tests.helpers import fill_random

    unet = DiffusionModelUNet(spatial_dims=3, in_channels=4, out_channels=4, channels=[8, 16],
                              attention_levels=[False, True], num_head_channels=[0, 8], num_res_blocks=1,
                              norm_num_groups=8, with_conditioning=True, cross_attention_dim=10,
                              upcast_attention=True).eval()
    fill_random(unet, 0)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195,
                              schedule="scaled_linear_beta", clip_sample=False)

    def run(condition, seed=0):
        noise = torch.randn((1, 4, 8, 8, 8), generator=torch.Generator().manual_seed(1))
        return sample_mask_latents(unet, scheduler, np.asarray(condition), noise, steps=5,
                                   generator=torch.Generator().manual_seed(seed))

    base = [0.5] * 5 + [-1] * 5
    first, again = run(base), run(base)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, run([0.9] * 5 + [-1] * 5))
    assert not torch.allclose(first, run(base, seed=1))
    assert torch.isfinite(first).all() and first.shape == (1, 4, 8, 8, 8)
