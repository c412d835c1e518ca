"""Built-in methods (installed as ``lwbench.methods``). Each module holds one method's whole algorithm."""
