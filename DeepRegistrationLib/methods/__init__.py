"""The method registry. Importing this package registers every method the library ships.

Each method is one file that reads like its paper; they share the blocks in ``base`` and the
spatial kit. ``get_method(name)`` returns a :class:`MethodSpec`.
"""
from .base import (METHODS, MethodSpec, RegistrationInputs, get_method, list_methods,  # noqa: F401
                   load_network, register_method, run_network, save_checkpoint)
from . import instance_optimisation  # noqa: F401  (registers "io")
from . import vmdiff  # noqa: F401  (registers "vm-diff")
from . import vtn  # noqa: F401  (registers "vtn")
from . import r2net  # noqa: F401  (registers "r2net-svf", "r2net-nsvf")
from . import ms_r2net  # noqa: F401  (registers "ms-r2net")
from . import mmln  # noqa: F401  (registers "mmln")
from . import suits  # noqa: F401  (registers "suits")
from . import multiprop  # noqa: F401  (registers "multiprop")
