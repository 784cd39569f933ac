"""The paper's experiment as an application: ``maskalign reproduce`` and
``maskalign report``.

Settings (``presets``), data sets (``data``), the training loop
(``training``), resumable stages (``stages``), the experiment itself
(``experiment``), its tables and plots (``report``) and the command line
(``cli``). Built on the library; the library never imports it.
"""
