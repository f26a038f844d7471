"""`python -m tcl.search`: the search command line."""
import torch

from . import main

main()
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
