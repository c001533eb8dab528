"""The supporting modules of Conformer, outside the Hub folder's remote code: `sources` (the one loader), `google_npz`
(Google's checkpoints), `hub_folder` (writing folders, ONNX), `data` (datasets), `cards` (model cards),
`timm_reference` (timm as the parity reference)."""
