"""PyTorch reference: pytorch-fid's FID Inception-v3 and Frechet distance.

Rewritten from, and kept behaviourally identical to:
  * torchvision/models/inception.py (github.com/pytorch/vision; BSD-3-Clause):
    BasicConv2d, InceptionA/B/C/D/E and Inception3's stem, pools and fc;
  * pytorch_fid/inception.py and pytorch_fid/fid_score.py
    (github.com/mseitzer/pytorch-fid, v0.3.0; Apache-2.0, Copyright 2018
    Institute of Bioinformatics, JKU Linz): FIDInceptionA/C/E_1/E_2,
    fid_inception_v3, InceptionV3.forward (resize, normalize, blocks) and
    calculate_frechet_distance.
It does not import torchvision (PyPI's does not import beside torch 2.13
here) and downloads nothing: weights are whatever the caller puts in.
Module attribute names are torchvision's, so `inception.state_dict()` has
the key names of pytorch-fid's pt_inception-2015-12-05-6726825d.pth.
"""
import warnings

import numpy as np
from scipy import linalg
import torch
from torch import nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------
# torchvision's Inception3 building blocks.


class BasicConv2d(nn.Module):

  def __init__(self, in_channels, out_channels, **kwargs):
    super().__init__()
    self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
    self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)), inplace=True)


class InceptionA(nn.Module):

  def __init__(self, in_channels, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

  def pool(self, x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)

  def forward(self, x):
    branch1x1 = self.branch1x1(x)
    branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
    branch3x3dbl = self.branch3x3dbl_3(
        self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    branch_pool = self.branch_pool(self.pool(x))
    return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):

  def __init__(self, in_channels):
    super().__init__()
    self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    branch3x3 = self.branch3x3(x)
    branch3x3dbl = self.branch3x3dbl_3(
        self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
    return torch.cat([branch3x3, branch3x3dbl, branch_pool], 1)


class InceptionC(nn.Module):

  def __init__(self, in_channels, channels_7x7):
    super().__init__()
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1),
                                      padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7),
                                      padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1),
                                      padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7),
                                      padding=(0, 3))
    self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

  def pool(self, x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)

  def forward(self, x):
    branch1x1 = self.branch1x1(x)
    branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    branch7x7dbl = self.branch7x7dbl_1(x)
    branch7x7dbl = self.branch7x7dbl_2(branch7x7dbl)
    branch7x7dbl = self.branch7x7dbl_3(branch7x7dbl)
    branch7x7dbl = self.branch7x7dbl_4(branch7x7dbl)
    branch7x7dbl = self.branch7x7dbl_5(branch7x7dbl)
    branch_pool = self.branch_pool(self.pool(x))
    return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)


class InceptionD(nn.Module):

  def __init__(self, in_channels):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7),
                                     padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1),
                                     padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
    branch7x7x3 = self.branch7x7x3_1(x)
    branch7x7x3 = self.branch7x7x3_2(branch7x7x3)
    branch7x7x3 = self.branch7x7x3_3(branch7x7x3)
    branch7x7x3 = self.branch7x7x3_4(branch7x7x3)
    branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
    return torch.cat([branch3x3, branch7x7x3, branch_pool], 1)


class InceptionE(nn.Module):

  def __init__(self, in_channels):
    super().__init__()
    self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3),
                                    padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1),
                                    padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3),
                                       padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1),
                                       padding=(1, 0))
    self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

  def pool(self, x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)

  def forward(self, x):
    branch1x1 = self.branch1x1(x)
    branch3x3 = self.branch3x3_1(x)
    branch3x3 = torch.cat([self.branch3x3_2a(branch3x3),
                           self.branch3x3_2b(branch3x3)], 1)
    branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl),
                              self.branch3x3dbl_3b(branch3x3dbl)], 1)
    branch_pool = self.branch_pool(self.pool(x))
    return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)


class Inception3(nn.Module):
  """torchvision's Inception3(num_classes, aux_logits=False,
  transform_input=False); the A/C/E blocks are replaceable as in
  torchvision's `inception_blocks` argument. Weight init is torch's default
  (pytorch-fid passes init_weights=False)."""

  def __init__(self, num_classes=1008, inception_a=InceptionA,
               inception_c=InceptionC, inception_e=(InceptionE, InceptionE)):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
    self.Mixed_5b = inception_a(192, pool_features=32)
    self.Mixed_5c = inception_a(256, pool_features=64)
    self.Mixed_5d = inception_a(288, pool_features=64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = inception_c(768, channels_7x7=128)
    self.Mixed_6c = inception_c(768, channels_7x7=160)
    self.Mixed_6d = inception_c(768, channels_7x7=160)
    self.Mixed_6e = inception_c(768, channels_7x7=192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = inception_e[0](1280)
    self.Mixed_7c = inception_e[1](2048)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.dropout = nn.Dropout(p=0.5)
    self.fc = nn.Linear(2048, num_classes)


# ---------------------------------------------------------------------------
# pytorch-fid's patches and wrapper.


class FIDInceptionA(InceptionA):
  """TF's average pool does not count the zero padding."""

  def pool(self, x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1,
                        count_include_pad=False)


class FIDInceptionC(InceptionC):

  def pool(self, x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1,
                        count_include_pad=False)


class FIDInceptionE_1(InceptionE):  # pylint: disable=invalid-name

  def pool(self, x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1,
                        count_include_pad=False)


class FIDInceptionE_2(InceptionE):  # pylint: disable=invalid-name
  """The FID graph max-pools in the last block's pool branch."""

  def pool(self, x):
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def fid_inception_v3():
  """pytorch-fid's fid_inception_v3() without the weight download."""
  return Inception3(num_classes=1008, inception_a=FIDInceptionA,
                    inception_c=FIDInceptionC,
                    inception_e=(FIDInceptionE_1, FIDInceptionE_2))


class InceptionV3(nn.Module):
  """pytorch-fid's InceptionV3(output_blocks=[3], resize_input=True,
  normalize_input=True): [N, 3, H, W] in [0, 1] -> pool3 [N, 2048].
  `self.inception` (not in pytorch-fid) keeps the Inception3 whose
  state_dict is the weight file's layout."""

  def __init__(self, inception=None):
    super().__init__()
    inception = fid_inception_v3() if inception is None else inception
    self.inception = inception
    self.blocks = nn.ModuleList([
        nn.Sequential(inception.Conv2d_1a_3x3, inception.Conv2d_2a_3x3,
                      inception.Conv2d_2b_3x3,
                      nn.MaxPool2d(kernel_size=3, stride=2)),
        nn.Sequential(inception.Conv2d_3b_1x1, inception.Conv2d_4a_3x3,
                      nn.MaxPool2d(kernel_size=3, stride=2)),
        nn.Sequential(inception.Mixed_5b, inception.Mixed_5c,
                      inception.Mixed_5d, inception.Mixed_6a,
                      inception.Mixed_6b, inception.Mixed_6c,
                      inception.Mixed_6d, inception.Mixed_6e),
        nn.Sequential(inception.Mixed_7a, inception.Mixed_7b,
                      inception.Mixed_7c, nn.AdaptiveAvgPool2d((1, 1))),
    ])

  def forward(self, x):
    x = F.interpolate(x, size=(299, 299), mode="bilinear",
                      align_corners=False)
    x = 2 * x - 1  # (0, 1) -> (-1, 1)
    for block in self.blocks:
      x = block(x)
    return x.squeeze(3).squeeze(2)  # [N, 2048], as get_activations reads it


def get_activations(model, images_uint8, batch_size=50):
  """fid_score.get_activations on in-memory uint8 [N, H, W, 3] images
  (ToTensor: HWC uint8 -> CHW float / 255) -> float64 [N, 2048]."""
  model.eval()
  out = np.empty((len(images_uint8), 2048))
  for start in range(0, len(images_uint8), batch_size):
    batch = torch.from_numpy(np.ascontiguousarray(
        images_uint8[start:start + batch_size])).permute(0, 3, 1, 2)
    with torch.no_grad():
      out[start:start + len(batch)] = model(batch.float() / 255).numpy()
  return out


def calculate_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """fid_score.calculate_frechet_distance, unchanged in behaviour."""
  mu1 = np.atleast_1d(mu1)
  mu2 = np.atleast_1d(mu2)
  sigma1 = np.atleast_2d(sigma1)
  sigma2 = np.atleast_2d(sigma2)
  assert mu1.shape == mu2.shape, (
      "Training and test mean vectors have different lengths")
  assert sigma1.shape == sigma2.shape, (
      "Training and test covariances have different dimensions")
  diff = mu1 - mu2
  # Product might be almost singular. (disp=False is deprecated in SciPy
  # 1.16; the result is unchanged.)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
  if not np.isfinite(covmean).all():
    print("fid calculation produces singular product; adding %s to diagonal "
          "of cov estimates" % eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  # Numerical error might give slight imaginary component
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      m = np.max(np.abs(covmean.imag))
      raise ValueError("Imaginary component {}".format(m))
    covmean = covmean.real
  tr_covmean = np.trace(covmean)
  return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean


def calculate_activation_statistics(act):
  """fid_score.calculate_activation_statistics, from activations."""
  return np.mean(act, axis=0), np.cov(act, rowvar=False)
