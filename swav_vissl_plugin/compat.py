"""placeholder"""


def apply_all():
    pass
