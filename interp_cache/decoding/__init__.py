"""interim"""
