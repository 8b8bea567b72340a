"""From image files to rows: inputs, crops, and the resumable batch job that ``score``, ``embed`` and ``label`` run.

    crops.py   how a photo becomes the model's input crop (as it comes, aligned by landmarks, or detected first)
    jobs.py    parallel decoding, batching, the journal that makes a run resumable, the errors file, output claims
"""
