"""Registration, the third stage: PET->CT per session and CT->CT between a subject's sessions, with ANTsPy.

Modules: :mod:`.transforms` (running a registration, transform files, threads, warps),
:mod:`.field_of_view` (body mask, head-and-neck box, crops and resampling), :mod:`.pet_to_ct`
(rigid PET->CT of a session) and :mod:`.sessions` (CT->CT alignment of two sessions).

Transform convention (ANTs / ITK, used by every file this module writes)
------------------------------------------------------------------------
A registration has a *fixed* and a *moving* image. The transform it writes maps **points of the
fixed space to points of the moving space** (LPS millimetres). That is the direction needed to
resample the moving image onto the fixed grid (``ants.apply_transforms(fixed, moving, [xfm])``).

* ``register_pet_to_ct``: fixed = CT, moving = PET. The ``from-pet_to-ct`` ``.mat`` maps a CT
  point to the PET point that images the same tissue; apply it as is to bring PET (or SUV)
  images into CT space, and *inverted* to bring CT-space label maps onto the PET grid
  (:func:`glandpet.segmentation.multi_atlas.labels_to_pet`).
* ``align_sessions``: fixed = the PSMA session's CT, moving = the FAPI session's CT. The composed
  transform ``[warp, affine]`` maps PSMA-CT points to FAPI-CT points; apply it to bring FAPI
  images into PSMA space (:func:`apply_session_transform`), and its inverse
  ``[affine^-1, inverse warp]`` to bring PSMA-space labels into FAPI space
  (:func:`apply_inverse_session_transform`).

Schedules are explicit (see the module constants): ANTsPy's presets run long fixed affine
schedules and ignore some arguments, so this module drives ``antsRegistration`` directly
through ANTsPy's library entry point, one call per registration with all its stages.

Images are read with ANTs (ITK: LPS world coordinates); NIfTI files on disk store RAS affines.
"""
