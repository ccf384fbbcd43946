"""The user tools on a trained model: evaluate, predict, fine-tune and export, and their CLI."""
