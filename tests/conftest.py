import torch

# The probe's tensors are small: one thread avoids oversubscribing two shared cores.
torch.set_num_threads(1)
