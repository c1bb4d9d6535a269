"""Small task functions shared by the unit and integration tests."""

import dagkube


@dagkube.task
def add(a, b):
    return a + b


@dagkube.task
def total(values):
    return sum(values)
