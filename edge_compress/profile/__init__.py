"""Device profiling: what a run cost on the device it ran on.

``edge_compress.profile.energy`` reads power sensors (RAPL, Jetson INA3221,
INA219/INA226, Android battery, USB meter CSV) and estimates energy where no
sensor exists. Nothing here imports torch: this package runs on devices that
have numpy at most, so import the submodules you need explicitly.
"""
