"""graphopt: config-driven graph-optimization passes for PaddlePaddle PIR programs.

Layers, each importing only those below it: ``cli`` > ``driver`` > ``serving`` (load a saved
step without tracing) > ``cache`` (the compile cache) > ``report`` > ``verification`` >
``config`` > ``runtime`` > ``passes`` > ``ir`` > ``models`` > ``errors``.
"""

import os
import warnings

# Paddle reads GLOG_minloglevel once, when it loads, and prints INFO lines without it; it also
# warns at import about things that are no user's concern (no ccache for C++ extensions).
os.environ.setdefault("GLOG_minloglevel", "2")
warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)

__version__ = "0.2.0"
