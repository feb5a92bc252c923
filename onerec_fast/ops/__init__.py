"""The fused ops: argument checks, torch.library custom ops (+ fake + autograd), backend choice and
the plain-PyTorch references (``<op>_ref``) that are both the test oracle and the CPU path."""
