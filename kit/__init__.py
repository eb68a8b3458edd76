"""The machinery behind the book's scripts, one module per concern.

The top level holds what a reader of chapter 7 opens: the book's files, the tools that use a
finetuned model, and the notebooks. What they share (checks of flags and files, the run's
files and checkpoints, the judge's client, the loopback judge, ...) lives here.
"""
