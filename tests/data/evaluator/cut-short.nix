# Cut off mid-file on purpose (tests/test_evaluator.py).
{ name = "cut-short"; value =
