"""A Flower app that trains an MLP on scikit-learn's digits in 8 bits with lptfl."""
