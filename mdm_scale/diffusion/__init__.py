"""The diffusion objective: keyed noise, t-samplers, mask generators, the weighted MDM / ARM losses, and the
noise services that watch them during training (``service.py``).

Importing the package imports each of its modules, so every t-sampler and mask generator defined in one is
registered against its config kind (``components.py``) before a run is built: a new one needs no list.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
