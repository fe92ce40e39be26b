"""The optimizer tests' fixtures: NumPy references written from the papers' formulas."""

import numpy as np
import pytest


def _inverse_fourth_root(matrix, ridge):
    """(A + ridge·λmax·I)^(-1/4) in float64, eigenvalues under ridge·λmax taken as 0."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    floor = ridge * eigenvalues.max()
    powers = (np.where(eigenvalues > floor, eigenvalues, 0) + floor) ** -0.25
    return (eigenvectors * powers) @ eigenvectors.T


@pytest.fixture(scope="session")
def inverse_fourth_root():
    """`inverse_fourth_root(matrix, ridge)`: the float64 reference of a preconditioner root."""
    return _inverse_fourth_root
