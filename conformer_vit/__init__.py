"""The supporting modules of Conformer, outside the Hub folder's remote code: `sources` (the one loader), `google_npz`
(Google's checkpoints), `hub_folder` (writing folders, ONNX), `output_paths` (the one check before any write),
`data` (datasets), `cards` (model cards), `sweep` (merge settings evaluated and timed), `timm_reference` (timm as the
parity reference)."""
