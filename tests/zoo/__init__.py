"""The model zoo of the tests: builders of small random-weight models and one
check (:func:`tests.zoo.harness.run_case`) that every zoo model must pass.

``harness``: the check (equivalence in eval and train mode, negative control,
noise floor, no mutation, typed errors, coverage). ``transformers_models``:
``transformers`` models with task heads built from tiny configs.
``patterns``: hand-made ``nn.Module`` patterns (one op family each).
``vision``: torchvision and timm models (second CI tier).
"""
