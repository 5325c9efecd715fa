from django.db import models


class Person(models.Model):
    name = models.CharField(max_length=100)
    address = models.CharField(max_length=200, blank=True, default="")

    class Meta:
        app_label = "djangoapp"
