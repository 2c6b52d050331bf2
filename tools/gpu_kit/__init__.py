"""The offline GPU kit: what it takes to prove fastres on a GPU machine lent for minutes,
with no network.

- `fastres pack-dali` (pack_dali.py): DALI as a kit of small parts for the target Python,
  with a manifest; `--install` from the parts, wherever they were copied.
- `fastres device-check` (device_check.py): every GPU path in one timed run of at most 9
  minutes, each stage sized from GPU measurements; `--dry-run` rehearses it on a CPU.
- `fastres loader-parity` (loader_parity.py): DALI against the tensor loader, pixel by
  pixel and draw by draw.
"""
